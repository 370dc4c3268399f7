use anyhow::Result;
use std::time::Duration;
use tests::daemon::{create_image, Daemon, ScratchDir};
use tests::raw_frontend::*;

#[test]
fn smoke_qsd() -> Result<()> {
    let dir = ScratchDir::new("hostile")?;
    let img = dir.join("disk.img");
    create_image(&img, 16 << 20)?;
    let sock = dir.join("sock");
    let _d = Daemon::qsd(&sock, &img, 1, false)?;
    let mut fe = RawFrontend::connect(&sock, Options::default())?;
    eprintln!("features {:#x} acked {:#x} proto {:?}", fe.device_features(), fe.acked_features(), fe.protocol_features());
    eprintln!("config {:?}", fe.config()?);
    fe.write(8, &[0x42u8; 4096])?;
    let d = fe.read(8, 4096)?;
    assert!(d.iter().all(|&b| b == 0x42));
    fe.flush()?;
    let (o, id) = fe.get_id(20)?;
    eprintln!("get_id {o} {:?}", String::from_utf8_lossy(&id));
    let _ = Duration::from_secs(1);
    Ok(())
}
