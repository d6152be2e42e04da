//! The operator API's JSON request bodies: any bytes give a value or an error naming the field
//! (status 400 or 422), never a panic; what is accepted is within the limits the server relies
//! on. (The config file has its own target, `config_file`, so each parser's coverage can
//! plateau on its own.)
#![no_main]

use appliance::api::{add_controller_request, login_request, new_volume_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for cluster in [false, true] {
        match new_volume_request(data, cluster) {
            Ok(v) => {
                assert!(v.size_bytes >= 1 << 20 && v.size_bytes % 4096 == 0);
                assert!(v.block_size == 512 || v.block_size == 4096);
                assert!(!v.name.is_empty() && v.name.len() <= 64);
                assert!(cluster || (v.k.is_none() && v.m.is_none()));
            }
            Err(e) => {
                let s = e.status().as_u16();
                assert!(s == 400 || s == 422, "status {s}");
                assert_eq!(s == 422, e.field_name().is_some());
            }
        }
    }
    let _ = login_request(data);
    if let Err(e) = add_controller_request(data) {
        let s = e.status().as_u16();
        assert!(s == 400 || s == 422, "status {s}");
    } else if let Ok((id, _)) = add_controller_request(data) {
        assert!(id >= 1);
    }
});
