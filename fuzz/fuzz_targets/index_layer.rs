//! Fuzzes the layer ingest path (gzip inflation with checkpoints + tar walking + path
//! hygiene + merge): arbitrary bytes as a layer blob must give an index or a typed error.
#![no_main]

use imagemesh_lazyindex::{IndexOptions, MergedTree, decode_layer, encode_layer, index_layer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let options = IndexOptions {
        span_size: imagemesh_lazyindex::MIN_SPAN_SIZE,
        checkpoint_threshold: 0,
        ..IndexOptions::default()
    };
    if let Ok(layer) = index_layer(data, &options) {
        let _ = MergedTree::from_layers([&layer]);
        // Whatever ingest produces must survive its own strict decoder.
        let decoded = decode_layer(&encode_layer(&layer)).expect("own index decodes");
        assert_eq!(decoded, layer);
    }
});
