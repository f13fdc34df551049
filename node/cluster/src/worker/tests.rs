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

#[test]
fn activations_that_are_not_finite_in_their_wire_type_are_never_sent() {
    use candle_core::{Device, Tensor};
    let seq = |request_id, rows| SeqRows {
        request_id,
        position: 0,
        rows,
        sample: false,
        draft: 0,
    };
    // Request 2's second row overflows f16 (but not f32).
    let h = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0, 7e4, 6.0], (3, 2), &Device::Cpu).unwrap();
    let (m, unsendable) = hidden_message(&h, vec![seq(1, 1), seq(2, 2)], DType::F16).unwrap();
    assert_eq!(unsendable, vec![2]);
    let Some(Message::Activations(a)) = m else {
        panic!("request 1 goes on")
    };
    assert_eq!(a.batch, vec![seq(1, 1)]);
    assert_eq!(decode_payload(&a.payload, a.dtype), vec![1.0, 2.0]);
    assert!(pass::finite_payload(&a.payload, a.dtype));
    let (m, unsendable) = hidden_message(&h, vec![seq(1, 1), seq(2, 2)], DType::F32).unwrap();
    assert!(m.is_some() && unsendable.is_empty());
    // The receiver's check, in each wire type.
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            assert!(!pass::finite_payload(
                &encode_payload(&[1.0, bad], dtype),
                dtype
            ));
        }
        assert!(pass::finite_payload(
            &encode_payload(&[1.0, -3e4, 0.0], dtype),
            dtype
        ));
    }
}
