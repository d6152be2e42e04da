//! What the appliance reads back from its own disks, which a failing disk or another program
//! may have damaged: the shard store's superblock and slot headers, and the persistent
//! reservation file (APTPL). Nothing may panic; a slot header that decodes re-encodes to the
//! same bytes; a reservation state that decodes survives a save and load unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use raid_engine::disk_store::{check_superblock, get_header, put_header};

fuzz_target!(|data: &[u8]| {
    // The superblock as read (one 4 KiB page), and whatever length came in.
    let mut page = vec![0u8; 4096];
    let n = data.len().min(page.len());
    page[..n].copy_from_slice(&data[..n]);
    let _ = check_superblock(&page, 64 << 10, 1000, false);
    let _ = check_superblock(data, 16 << 10, 0, true);
    if let Some(h) = get_header(data) {
        let mut again = vec![0u8; 4096];
        put_header(&h, &mut again);
        assert_eq!(get_header(&again).as_ref(), Some(&h));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(state) = lun::pr_store::decode(text) {
            let again = lun::pr_store::encode(&state);
            assert_eq!(lun::pr_store::decode(&again).as_ref(), Ok(&state));
        }
    }
});
