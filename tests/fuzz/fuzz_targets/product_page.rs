//! Fuzz target: the product-page decoder (bytes from the management system).
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::product_page(data));
