//! A slow link on loopback: a UDP relay that delays every datagram.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// A UDP relay that delays every datagram, both ways: put in front of a
/// node's QUIC data plane (`--data-advertise`), it makes a slow link on
/// loopback (this kernel has no netem).
pub struct UdpRelay {
    /// Where peers send to.
    pub addr: std::net::SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl UdpRelay {
    /// Relays to `target`, delaying each datagram by `delay` plus up to `jitter`.
    pub fn start(target: std::net::SocketAddr, delay: Duration, jitter: Duration) -> UdpRelay {
        use std::collections::HashMap;
        use std::net::UdpSocket;
        use std::sync::atomic::AtomicBool;
        use std::sync::{mpsc, Arc};
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").expect("relay socket"));
        let addr = front.local_addr().expect("bound");
        let stop = Arc::new(AtomicBool::new(false));
        // One delay line: (due, socket, destination, bytes), sent in due order.
        type Item = (Instant, Arc<UdpSocket>, std::net::SocketAddr, Vec<u8>);
        let (tx, rx) = mpsc::channel::<Item>();
        std::thread::spawn(move || {
            let mut queue: Vec<Item> = Vec::new();
            loop {
                let wait = queue
                    .iter()
                    .map(|i| i.0)
                    .min()
                    .map_or(Duration::from_millis(50), |d| {
                        d.saturating_duration_since(Instant::now())
                    });
                match rx.recv_timeout(wait) {
                    Ok(item) => queue.push(item),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
                let now = Instant::now();
                queue.sort_by_key(|i| i.0);
                while queue.first().is_some_and(|i| i.0 <= now) {
                    let (_, sock, to, bytes) = queue.remove(0);
                    let _ = sock.send_to(&bytes, to);
                }
            }
        });
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut due = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let j = jitter.as_micros() as u64;
            Instant::now() + delay + Duration::from_micros(if j == 0 { 0 } else { seed % j })
        };
        let stop2 = stop.clone();
        std::thread::spawn(move || {
            front
                .set_read_timeout(Some(Duration::from_millis(100)))
                .expect("timeout");
            let mut backs: HashMap<std::net::SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut buf = vec![0u8; 65536];
            while !stop2.load(Ordering::Relaxed) {
                let Ok((n, client)) = front.recv_from(&mut buf) else {
                    continue;
                };
                let back = backs.entry(client).or_insert_with(|| {
                    // One socket per client towards the target; its replies go back delayed.
                    let back = Arc::new(UdpSocket::bind("127.0.0.1:0").expect("relay socket"));
                    let (reader, front, tx, stop) =
                        (back.clone(), front.clone(), tx.clone(), stop2.clone());
                    let mut due = {
                        let mut s = 0x2545_F491_4F6C_DD1Du64 ^ client.port() as u64;
                        move || {
                            s ^= s << 13;
                            s ^= s >> 7;
                            s ^= s << 17;
                            let j = jitter.as_micros() as u64;
                            Instant::now()
                                + delay
                                + Duration::from_micros(if j == 0 { 0 } else { s % j })
                        }
                    };
                    std::thread::spawn(move || {
                        reader
                            .set_read_timeout(Some(Duration::from_millis(100)))
                            .expect("timeout");
                        let mut buf = vec![0u8; 65536];
                        while !stop.load(Ordering::Relaxed) {
                            if let Ok(n) = reader.recv(&mut buf) {
                                let _ = tx.send((due(), front.clone(), client, buf[..n].to_vec()));
                            }
                        }
                    });
                    back.connect(target).expect("connect to target");
                    back
                });
                let _ = tx.send((due(), back.clone(), target, buf[..n].to_vec()));
            }
        });
        UdpRelay { addr, stop }
    }
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
