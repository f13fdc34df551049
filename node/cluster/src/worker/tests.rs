use super::*;

#[test]
fn payloads_round_trip() {
    let v = [1.5f32, -2.25, 1e4, 0.0];
    assert_eq!(
        decode_payload(&encode_payload(&v, DType::F32), DType::F32),
        v
    );
    assert_eq!(
        decode_payload(&encode_payload(&v, DType::F16), DType::F16),
        v
    );
    assert_eq!(
        decode_payload(&encode_payload(&v, DType::BF16), DType::BF16)[..2],
        v[..2]
    );
}
