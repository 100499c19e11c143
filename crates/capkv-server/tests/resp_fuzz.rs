//! A fuzz harness for the RESP decoder that runs on stable Rust: seeded random requests,
//! valid and mutated (bit flips, cut short, spliced, random lengths and counts), decoded
//! whole and byte by byte. The decoder must never panic, never claim more bytes than it was
//! given, agree with itself however the bytes arrive, and give back exactly what a valid
//! request carried. The suite runs a few seconds' worth; `scripts/fuzz-resp.sh 10m` runs it
//! for as long as asked (`CAPKV_FUZZ_SECONDS`); `CAPKV_FUZZ_SEED` replays a seed.

use std::time::{Duration, Instant};

use capkv_server::frontend::resp::codec::{decode, DecodeLimits};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn encode(args: &[Vec<u8>]) -> Vec<u8> {
    let args: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
    capkv_testkit::resp::encode(&args)
}

fn random_args(rng: &mut StdRng) -> Vec<Vec<u8>> {
    let n = rng.random_range(1..8);
    (0..n)
        .map(|_| {
            let len = match rng.random_range(0..10) {
                0 => 0,
                1 => rng.random_range(100..3000),
                _ => rng.random_range(1..12),
            };
            let alphabet: &[u8] = if rng.random_bool(0.3) {
                b"\r\n*$:+-\"' \\x0123456789"
            } else {
                b"abcdefghijklmnopqrstuvwxyz"
            };
            (0..len)
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect()
        })
        .collect()
}

/// A request, possibly broken.
fn input(rng: &mut StdRng) -> (Vec<u8>, Option<Vec<Vec<u8>>>) {
    let args = random_args(rng);
    let mut bytes = encode(&args);
    match rng.random_range(0..8) {
        0 | 1 => (bytes, Some(args)),
        2 => {
            let at = rng.random_range(0..bytes.len());
            bytes[at] ^= 1 << rng.random_range(0..8);
            (bytes, None)
        }
        3 => {
            bytes.truncate(rng.random_range(0..bytes.len()));
            (bytes, None)
        }
        4 => {
            // Spliced with another request's tail.
            let other = encode(&random_args(rng));
            let cut = rng.random_range(0..bytes.len());
            bytes.truncate(cut);
            bytes.extend_from_slice(&other[rng.random_range(0..other.len())..]);
            (bytes, None)
        }
        5 => {
            // Lengths and counts anywhere in i64, and then some.
            let n: i64 = rng.random();
            let s = format!("{}{}\r\n", if rng.random_bool(0.5) { "*" } else { "$" }, n);
            (s.into_bytes(), None)
        }
        6 => {
            // An inline request.
            let mut line: Vec<u8> = args.join(&b' ');
            line.extend_from_slice(b"\r\n");
            (line, None)
        }
        _ => {
            let len = rng.random_range(0..64);
            ((0..len).map(|_| rng.random()).collect(), None)
        }
    }
}

fn check(bytes: &[u8], valid: Option<&Vec<Vec<u8>>>, limits: &DecodeLimits) {
    let whole = decode(bytes, limits);
    if let Ok(Some((_, used))) = &whole {
        assert!(
            *used <= bytes.len() && *used > 0,
            "claimed {used} of {} bytes",
            bytes.len()
        );
    }
    if let Some(args) = valid {
        let (got, used) = whole
            .clone()
            .expect("a valid request decodes")
            .expect("whole");
        assert_eq!(&got, args);
        assert_eq!(used, bytes.len());
    }
    // However the bytes arrive, the first complete answer is the same.
    let mut first_answer = None;
    for end in 0..=bytes.len() {
        match decode(&bytes[..end], limits) {
            Ok(None) => continue,
            other => {
                first_answer = Some(other);
                break;
            }
        }
    }
    // A prefix completes no earlier than the whole, errs only if the whole errs, and a
    // request decodes the same from its own bytes as from the whole input.
    match (&whole, first_answer) {
        (Ok(None), None) | (Err(_), Some(Err(_))) => {}
        (Ok(Some(w)), Some(Ok(Some(p)))) => assert_eq!(w, &p),
        (w, p) => panic!("the whole input gives {w:?}, its prefixes {p:?}"),
    }
}

#[test]
fn the_resp_decoder_survives_random_and_broken_input() {
    let seed = std::env::var("CAPKV_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    let budget = std::env::var("CAPKV_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(2), Duration::from_secs);
    println!("seed {seed} (CAPKV_FUZZ_SEED replays it), for {budget:?}");
    let mut rng = StdRng::seed_from_u64(seed);
    let limits = DecodeLimits {
        args_max: 6,
        bulk_max: 2000,
        inline_max: 4000,
        request_max: 6000,
    };
    let started = Instant::now();
    let mut cases = 0u64;
    while started.elapsed() < budget {
        let (bytes, valid) = input(&mut rng);
        let valid = valid
            .filter(|a| a.len() <= limits.args_max && a.iter().all(|x| x.len() <= limits.bulk_max));
        check(&bytes, valid.as_ref(), &limits);
        cases += 1;
    }
    println!("{cases} inputs, no failure");
    assert!(cases > 100, "the harness ran");
}
