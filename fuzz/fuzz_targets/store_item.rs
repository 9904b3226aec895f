//! The store's value decoders that tern-broker makes public, over arbitrary
//! bytes: `StoredItem::decode` (a queue entry; also what a peer's `Ship`
//! entries must pass before they are stored), the account record's JSON
//! (`Account`, also what a peer's `AccountPut` and `AccountReply` carry) and
//! `QueueKey`'s accessors.
//!
//! Asserts: no panic; a decoded item re-encodes no longer than it came, with
//! its enqueue time, and decodes back equal; a decoded account serialises
//! and reads back equal; a queue key gives back its handle and device.
//!
//! Not reachable from here (crate-private in broker/src/store): `split_item`
//! and `enqueued_at` (item.rs), `decode_handed` and `QueueKey::from_bytes`
//! (keys.rs), `Account::from_json` (accounts.rs; the same serde code as
//! below). See docs/fuzzing.md.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_broker::store::{Account, QueueKey, StoredItem};
use tern_fuzz::Input;

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    match input.u8() % 3 {
        0 => stored_item(input.rest()),
        1 => account(input.rest()),
        _ => queue_key(input.u32(), input.rest()),
    }
});

fn stored_item(value: &[u8]) {
    let Ok(item) = StoredItem::decode(value) else { return };
    let bytes = item.encode();
    assert!(bytes.len() <= value.len(), "{} > {}", bytes.len(), value.len());
    assert_eq!(bytes[..8], value[..8], "the enqueue time is kept");
    assert_eq!(StoredItem::decode(&bytes).expect("re-decodes"), item);
}

fn account(json: &[u8]) {
    let Ok(account) = serde_json::from_slice::<Account>(json) else { return };
    let again = serde_json::to_vec(&account).expect("serialises");
    let back: Account = serde_json::from_slice(&again).expect("reads back");
    assert_eq!(back, account);
    for d in &account.devices {
        assert!(account.device(d.id).is_some());
    }
}

fn queue_key(device: u32, handle: &[u8]) {
    let handle = String::from_utf8_lossy(handle);
    let key = QueueKey::new(&handle, device);
    assert_eq!(key.handle(), handle);
    assert_eq!(key.device(), device);
    let _ = key.to_string();
}
