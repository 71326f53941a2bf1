//! GPU drivers: the `gpu` key is recognised, loading its drivers is not implemented yet.

use guest_protocol::Config;

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("config requests a GPU but this guest-init cannot load GPU drivers yet; remove `gpu`")]
    GpuUnsupported,
}

pub fn check_supported(config: &Config) -> Result<(), DriverError> {
    if config.gpu {
        return Err(DriverError::GpuUnsupported);
    }
    Ok(())
}
