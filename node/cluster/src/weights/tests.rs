use super::*;

fn index_of(path: &Path) -> WeightIndex {
    let hashes = manifest::chunk_hashes(path).unwrap();
    WeightIndex {
        model_hash: [0; 32],
        layer_hashes: Vec::new(),
        ends_hash: [0; 32],
        header_hash: [0; 32],
        header_bytes: 0,
        file_bytes: std::fs::metadata(path).unwrap().len(),
        chunk_bytes: CHUNK_BYTES,
        have: vec![0; hashes.len()],
        chunk_hashes: hashes,
    }
}

#[test]
// One-range lists are the natural way to ask about one span here.
#[allow(clippy::single_range_in_vec_init)]
fn chunks_are_checked_recorded_and_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.gguf");
    let data: Vec<u8> = (0..(2 * CHUNK_BYTES as usize + 1000))
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    std::fs::write(&src, &data).unwrap();
    let index = index_of(&src);
    assert_eq!(index.chunk_hashes.len(), 3);
    let dst = dir.path().join("dst.gguf");
    let store = open_partial(&dst, &index).unwrap();
    let c = u64::from(CHUNK_BYTES);
    assert_eq!(store.missing(&[10..20, c - 1..c + 1]), vec![0, 1]);
    assert_eq!(store.missing(&[3 * c - 10..3 * c]), vec![2]);
    // A corrupted chunk is refused and not recorded; the right one is.
    let whole = WeightStore::whole(&src);
    let mut chunk = whole.read_chunk(1).unwrap();
    chunk[7] ^= 1;
    assert!(!store.put_chunk(1, &chunk).unwrap());
    chunk[7] ^= 1;
    assert!(store.put_chunk(1, &chunk).unwrap());
    assert_eq!(store.missing(&[0..3 * c]), vec![0, 2]);
    assert!(store.read_chunk(0).is_none() && store.read_chunk(1) == Some(chunk));
    // The record survives a restart; the short last chunk fits exactly.
    let again = open_partial(&dst, &index).unwrap();
    assert_eq!(again.missing(&[0..3 * c]), vec![0, 2]);
    for i in [0, 2] {
        assert!(again.put_chunk(i, &whole.read_chunk(i).unwrap()).unwrap());
    }
    assert!(again.is_complete());
    assert_eq!(std::fs::read(&dst).unwrap(), data);
    assert!(again.status().complete && again.status().have_bytes == data.len() as u64);
}
