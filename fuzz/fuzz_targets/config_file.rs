//! The controller config file (TOML): any text gives a config or an error naming the key,
//! never a panic; what is accepted has a volume and a portal to serve (the rest of the
//! appliance relies on both).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(c) = appliance::config::Config::parse(text, std::path::Path::new("fuzz.toml")) {
            assert!(!c.volumes.is_empty() && !c.listen.is_empty());
        }
    }
});
