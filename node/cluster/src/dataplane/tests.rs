use std::time::Duration;

use super::*;
use protocol::{SampledToken, Tokens};

fn members(of: &[&Arc<DataPlane>]) -> HashMap<String, PeerData> {
    of.iter()
        .map(|p| {
            (
                p.me.clone(),
                PeerData {
                    addr: p.local_addr(),
                    fingerprint: p.fingerprint(),
                },
            )
        })
        .collect()
}

fn token(request_id: u64, token: u32) -> Message {
    Message::Tokens(Tokens {
        entries: vec![SampledToken {
            request_id,
            position: 0,
            token,
        }],
        logprobs: Vec::new(),
    })
}

#[tokio::test]
async fn tokens_are_taken_only_from_the_requests_last_stage() {
    let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let a = DataPlane::bind("a".into(), local, Default::default()).unwrap();
    let b = DataPlane::bind("b".into(), local, Default::default()).unwrap();
    let c = DataPlane::bind("c".into(), local, Default::default()).unwrap();
    a.set_members(members(&[&b, &c]));
    b.set_members(members(&[&a, &c]));
    c.set_members(members(&[&a, &b]));
    let mut rx = a.open_request(7, vec!["c".into(), "b".into()]);
    // c is a member and on the route, but not its last stage: a token
    // from it (a hijack) is dropped; b's arrives.
    c.send("a", token(7, 666)).await.unwrap();
    b.send("a", token(7, 42)).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap();
    assert_eq!(got, Some(token(7, 42)));
    // When b leaves, its connection into a is closed.
    a.set_members(members(&[&c]));
    // (The send itself may or may not fail: the link may still look open.)
    let _ = b.send("a", token(7, 43)).await;
    let late = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await;
    assert!(late.is_err(), "a departed member's token arrived: {late:?}");
}

#[tokio::test]
async fn members_talk_strangers_are_refused_and_garbage_closes_only_its_connection() {
    let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let a = DataPlane::bind("a".into(), local, Default::default()).unwrap();
    let b = DataPlane::bind("b".into(), local, Default::default()).unwrap();
    a.set_members(members(&[&b]));
    b.set_members(members(&[&a]));
    let mut rx = a.open_request(7, vec!["b".into()]);
    b.send("a", token(7, 42)).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap();
    assert_eq!(got, Some(token(7, 42)));

    // A stranger's certificate is refused at the handshake.
    let stranger = Identity::generate();
    let ep = quinn::Endpoint::client(local).unwrap();
    let conn = ep
        .connect_with(
            stranger.client_config(a.fingerprint()),
            a.local_addr(),
            "shoal",
        )
        .unwrap()
        .await;
    let refused = match conn {
        Err(_) => true,
        Ok(c) => {
            c.open_uni().await.is_err() || {
                // TLS 1.3 client auth fails after the client's handshake completes.
                tokio::time::timeout(Duration::from_secs(5), c.closed())
                    .await
                    .is_ok()
            }
        }
    };
    assert!(refused, "a stranger reached the data plane");

    // A member sending garbage loses its connection; others keep working.
    let member = Identity::generate();
    a.allowed.write().unwrap().insert(member.fingerprint);
    let conn = ep
        .connect_with(
            member.client_config(a.fingerprint()),
            a.local_addr(),
            "shoal",
        )
        .unwrap()
        .await
        .unwrap();
    let mut s = conn.open_uni().await.unwrap();
    s.write_all(&[8, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("garbage closes the connection");
    assert!(
        matches!(closed, quinn::ConnectionError::ApplicationClosed(_)),
        "{closed}"
    );
    b.send("a", token(7, 43)).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap();
    assert_eq!(got, Some(token(7, 43)));
}
