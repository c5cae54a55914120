//! gRPC messages counted in a body as it streams by, as Envoy counts them for Istio's
//! `istio_request_messages_total` and `istio_response_messages_total`. A leaf: bytes in, a
//! count out; nothing else.
//!
//! A gRPC message on the wire is a 5-byte prefix — 1 byte of flags, a 4-byte big-endian
//! length — then that many bytes of payload (grpc/grpc `doc/PROTOCOL-HTTP2.md`,
//! "Length-Prefixed-Message"). A body arrives in chunks cut anywhere: a chunk may hold many
//! messages, a message may span many chunks, a prefix may be cut in two. The counter keeps its
//! place between chunks and reads each byte once.
//!
//! What it counts is what Envoy counts (envoyproxy/envoy `source/common/grpc/codec.cc`,
//! `FrameInspector::inspect`): a message when its first byte (the flags) is seen — "Counter is
//! incremented on a frame start" (`codec.h`, `frameCount`) — not when its payload is complete;
//! any flags byte, since the inspector's `frameStart` accepts every flag (only `Decoder`, which
//! Envoy's `grpc_stats` filter does not use, refuses unknown flags); the declared length is
//! trusted only to skip the payload (no limit: `max_frame_length_` is 0 for an inspector), so
//! the payload is never buffered and a huge declared length only means the rest of the body
//! is that payload. The response side is read by `ResponseFrameCounter`
//! (`source/extensions/filters/http/grpc_stats/response_frame_counter.cc`), which treats a
//! frame with the Connect end-of-stream flag (`CONNECT_FH_EOS`, `0x02`) as the end: that frame
//! is not counted (`inspect`: `delta--; count_--`), and no frame after it is (`frameStart`
//! returns false once it has been seen).

/// The Connect protocol's end-of-stream flag (Envoy `source/common/grpc/codec.h`,
/// `CONNECT_FH_EOS`).
const CONNECT_END_OF_STREAM: u8 = 0x02;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for a message's flags byte: the next byte starts a message.
    Flags,
    /// `read` bytes (0 to 3) of the big-endian length read so far, accumulated in `len`.
    Length { read: u8, len: u32 },
    /// This many payload bytes still to skip (never 0).
    Payload(u32),
    /// A response's Connect end-of-stream frame was seen: nothing more is counted.
    Ended,
}

/// Counts the gRPC messages of one body, one direction.
#[derive(Debug, Clone)]
pub struct FrameCounter {
    state: State,
    count: u64,
    /// Response bodies only: a frame flagged `CONNECT_FH_EOS` ends the counting.
    end_on_connect_eos: bool,
}

impl FrameCounter {
    /// A request body's counter (Envoy `grpc_stats`: `Grpc::FrameInspector request_counter_`).
    pub fn request() -> Self {
        FrameCounter {
            state: State::Flags,
            count: 0,
            end_on_connect_eos: false,
        }
    }

    /// A response body's counter (Envoy `grpc_stats`: `ResponseFrameCounter
    /// response_counter_`).
    pub fn response() -> Self {
        FrameCounter {
            end_on_connect_eos: true,
            ..Self::request()
        }
    }

    /// The messages counted so far (Envoy: `frameCount()`).
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Reads the next chunk of the body; returns how many messages started in it (Envoy:
    /// `inspect`'s return, the delta). Any bytes, any length: never panics.
    pub fn inspect(&mut self, chunk: &[u8]) -> u64 {
        let mut started = 0u64;
        let mut rest = chunk;
        while let Some((&byte, after)) = rest.split_first() {
            match self.state {
                // A whole prefix in this chunk (the common case): read at once.
                State::Flags if rest.len() >= 5 => {
                    if self.end_on_connect_eos && byte & CONNECT_END_OF_STREAM != 0 {
                        self.state = State::Ended;
                        break;
                    }
                    started += 1;
                    let Some(([_, l0, l1, l2, l3], after)) = rest.split_first_chunk::<5>() else {
                        break;
                    };
                    let len = u32::from_be_bytes([*l0, *l1, *l2, *l3]);
                    self.state = if len == 0 {
                        State::Flags
                    } else {
                        State::Payload(len)
                    };
                    rest = after;
                }
                State::Flags => {
                    if self.end_on_connect_eos && byte & CONNECT_END_OF_STREAM != 0 {
                        self.state = State::Ended;
                        break;
                    }
                    started += 1;
                    self.state = State::Length { read: 0, len: 0 };
                    rest = after;
                }
                State::Length { read, len } => {
                    let len = (len << 8) | u32::from(byte);
                    self.state = match read {
                        0..=2 => State::Length {
                            read: read + 1,
                            len,
                        },
                        _ if len == 0 => State::Flags,
                        _ => State::Payload(len),
                    };
                    rest = after;
                }
                State::Payload(left) => {
                    // `left` fits in a usize on every target Outrigger builds for; were it
                    // not, the whole chunk is payload all the same.
                    let take = usize::try_from(left).map_or(rest.len(), |l| l.min(rest.len()));
                    // `take` <= `left`, so this cannot underflow, and it fits in u32.
                    let left = left - u32::try_from(take).unwrap_or(left);
                    self.state = if left == 0 {
                        State::Flags
                    } else {
                        State::Payload(left)
                    };
                    rest = rest.get(take..).unwrap_or_default();
                }
                State::Ended => break,
            }
        }
        self.count += started;
        started
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One message: flags, big-endian length, payload.
    fn message(flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut m = vec![flags];
        m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        m.extend_from_slice(payload);
        m
    }

    /// The offsets at which messages start in a well-formed stream.
    fn starts(stream: &[u8]) -> Vec<usize> {
        let mut at = 0;
        let mut out = Vec::new();
        while at < stream.len() {
            out.push(at);
            let len = u32::from_be_bytes(stream[at + 1..at + 5].try_into().unwrap()) as usize;
            at += 5 + len;
        }
        out
    }

    /// Every way to cut a stream of three messages (one empty) into chunks: after each chunk
    /// the count is the number of messages whose first byte has been seen (Envoy counts at
    /// the frame start), and at the end it is 3.
    #[test]
    fn every_chunking_counts_each_message_once_at_its_first_byte() {
        let mut stream = message(0, b"");
        stream.extend(message(1, b"a"));
        stream.extend(message(0, b"xyz"));
        let starts = starts(&stream);
        assert_eq!(starts, vec![0, 5, 11]);
        let cuts = stream.len() - 1;
        for mask in 0u32..(1 << cuts) {
            let mut c = FrameCounter::request();
            let mut from = 0;
            let mut total = 0;
            for end in
                (1..=stream.len()).filter(|&i| i == stream.len() || mask & (1 << (i - 1)) != 0)
            {
                total += c.inspect(&stream[from..end]);
                let expected = starts.iter().filter(|&&s| s < end).count() as u64;
                assert_eq!(
                    (c.count(), total),
                    (expected, expected),
                    "mask {mask:b} end {end}"
                );
                from = end;
            }
            assert_eq!(c.count(), 3);
        }
    }

    /// One message whose prefix and payload are cut over five chunks is counted once, at its
    /// first chunk; the message after it is counted too.
    #[test]
    fn message_split_across_five_chunks() {
        let payload = vec![7u8; 300];
        let mut stream = message(0, &payload);
        stream.extend(message(0, b"next"));
        let mut c = FrameCounter::request();
        let deltas: Vec<u64> = [&stream[..1], &stream[1..3], &stream[3..5], &stream[5..100]]
            .iter()
            .map(|chunk| c.inspect(chunk))
            .collect();
        assert_eq!(deltas, vec![1, 0, 0, 0]);
        assert_eq!(c.inspect(&stream[100..]), 1);
        assert_eq!(c.count(), 2);
        assert_eq!(c.state, State::Flags);
    }

    #[test]
    fn empty_messages_and_empty_chunks() {
        let mut c = FrameCounter::request();
        assert_eq!(c.inspect(&[]), 0);
        let stream: Vec<u8> = (0..1000).flat_map(|_| message(0, b"")).collect();
        assert_eq!(c.inspect(&stream), 1000);
        assert_eq!(c.inspect(&[]), 0);
        assert_eq!(c.count(), 1000);
    }

    /// A declared length of 4 GiB - 1: one message, and everything after the prefix is its
    /// payload, whatever it looks like; nothing is buffered and nothing overflows.
    #[test]
    fn huge_declared_length_is_one_message_then_payload() {
        let mut c = FrameCounter::request();
        assert_eq!(c.inspect(&[0, 0xff, 0xff, 0xff, 0xff]), 1);
        let looks_like_messages: Vec<u8> = (0..100).flat_map(|_| message(0, b"")).collect();
        for _ in 0..100 {
            assert_eq!(c.inspect(&looks_like_messages), 0);
        }
        assert_eq!(c.count(), 1);
        assert_eq!(c.state, State::Payload(u32::MAX - 100 * 500));
    }

    /// Unknown flags are counted (Envoy's inspector accepts any flags byte); a request
    /// counter counts a Connect end-of-stream flag like any other.
    #[test]
    fn any_flags_count_on_requests() {
        let mut c = FrameCounter::request();
        let stream: Vec<u8> = [0u8, 1, 2, 0x80, 0xff]
            .iter()
            .flat_map(|&f| message(f, b"p"))
            .collect();
        assert_eq!(c.inspect(&stream), 5);
    }

    /// Envoy's `ResponseFrameCounter`: the Connect end-of-stream frame is not counted, and
    /// neither is anything after it, in the same chunk or a later one.
    #[test]
    fn response_ends_at_connect_end_of_stream() {
        let mut stream = message(0, b"one");
        stream.extend(message(1, b"two"));
        stream.extend(message(CONNECT_END_OF_STREAM, b"{}"));
        stream.extend(message(0, b"after"));
        for cut in 0..=stream.len() {
            let mut c = FrameCounter::response();
            let n =
                c.inspect(&stream[..cut]) + c.inspect(&stream[cut..]) + c.inspect(&message(0, b""));
            assert_eq!(n, 2, "cut {cut}");
            assert_eq!(c.count(), 2);
        }
        // The same bytes on a request are four messages, then one more.
        let mut c = FrameCounter::request();
        assert_eq!(c.inspect(&stream), 4);
    }

    /// `stream` cut at `cuts` (offsets, any order, out of range ignored).
    fn cut_at<'a>(stream: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
        let mut at: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
        at.push(0);
        at.push(stream.len());
        at.sort_unstable();
        at.windows(2).map(|w| &stream[w[0]..w[1]]).collect()
    }

    proptest::proptest! {
        /// Well-formed messages of any sizes, cut anywhere: each counted once.
        #[test]
        fn messages_cut_anywhere_are_each_counted_once(
            payloads in proptest::collection::vec(proptest::collection::vec(0u8..=255, 0..40), 0..12),
            flags in proptest::collection::vec(0u8..=1, 12),
            cuts in proptest::collection::vec(0usize..1000, 0..20),
        ) {
            let stream: Vec<u8> = payloads
                .iter()
                .zip(&flags)
                .flat_map(|(p, &f)| message(f, p))
                .collect();
            let mut c = FrameCounter::request();
            let n: u64 = cut_at(&stream, &cuts).iter().map(|chunk| c.inspect(chunk)).sum();
            proptest::prop_assert_eq!((n, c.count()), (payloads.len() as u64, payloads.len() as u64));
            proptest::prop_assert_eq!(c.state, State::Flags);
        }

        /// Any bytes, either side, cut anywhere: no panic, the same count as in one piece, and
        /// never more than one message per 5 bytes (rounded up).
        #[test]
        fn any_bytes_count_the_same_however_cut(
            bytes in proptest::collection::vec(0u8..=255, 0..300),
            cuts in proptest::collection::vec(0usize..1000, 0..20),
            response in proptest::bool::ANY,
        ) {
            let new = || if response { FrameCounter::response() } else { FrameCounter::request() };
            let mut whole = new();
            let n = whole.inspect(&bytes);
            proptest::prop_assert!(n <= bytes.len().div_ceil(5) as u64);
            let mut cut = new();
            let m: u64 = cut_at(&bytes, &cuts).iter().map(|chunk| cut.inspect(chunk)).sum();
            proptest::prop_assert_eq!((m, cut.count()), (n, n));
        }
    }
}
