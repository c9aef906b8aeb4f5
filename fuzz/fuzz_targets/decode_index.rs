//! Fuzzes index decoding: arbitrary bytes must decode to an error or to an index that is safe
//! to merge and to plan reads against — never a panic or an unbounded allocation.
#![no_main]

use imagemesh_lazyindex::{DecodeLimits, MergedTree, decode_image, decode_image_head, decode_layer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(layer) = decode_layer(data) {
        let _ = MergedTree::from_layers([&layer]);
        let _ = layer.plan_read(0..layer.uncompressed_size.min(4096));
    }
    if let Ok(image) = decode_image(data) {
        let _ = MergedTree::from_layers(&image.layers);
    }
    // The head alone, as the mounter decodes it (windows left in the registry).
    if let Ok(image) = decode_image_head(data, &DecodeLimits::default()) {
        let _ = MergedTree::from_layers(&image.layers);
    }
});
