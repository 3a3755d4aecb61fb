//! Fuzz target: the config loader on arbitrary bytes returns Ok or Err, in bounded time, and a
//! config it accepts survives the admin API's JSON round trip unchanged (GET, then PUT it back).
#![no_main]

use libfuzzer_sys::fuzz_target;
use speedmimi::config::{Config, FileConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(config) = Config::parse_bytes(data) else { return };
    let json = serde_json::to_value(&config.file).expect("a valid config serializes");
    let back: FileConfig = serde_json::from_value(json).expect("the served JSON parses back");
    assert_eq!(back, config.file, "the JSON round trip changed the config");
    back.validate().expect("a valid config is still valid after the JSON round trip");
});
