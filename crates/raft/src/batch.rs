//! Several commands in one log entry.
//!
//! openraft 0.9 waits for each append's fsync before it takes the next
//! write of a group, so one entry per write would mean one fsync per
//! write. Writes that arrive while a group's entry is on its way are
//! queued and go together in the next entry: the batch is encoded as
//! length-prefixed commands, and the replies come back the same way.

/// Encodes `items` as one batch.
pub(crate) fn encode<'a>(items: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for item in items {
        // A command is far below 4 GiB: the cluster's frames are 64 MiB.
        out.extend_from_slice(&u32::try_from(item.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(item);
    }
    out
}

/// Appends one item to a batch in `out`, as `write` writes it there (no
/// copy of it is made first).
pub(crate) fn push(out: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    write(out);
    let len = u32::try_from(out.len() - at - 4).unwrap_or(u32::MAX);
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
}

/// The items of a batch; `None` if it is malformed.
pub(crate) fn decode(mut bytes: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
        out.push(bytes.get(4..4 + len)?);
        bytes = &bytes[4 + len..];
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_round_trips_and_a_torn_one_is_refused() {
        let items: Vec<&[u8]> = vec![b"one", b"", b"three"];
        let bytes = encode(items.iter().copied());
        assert_eq!(decode(&bytes), Some(items.clone()));
        assert_eq!(decode(&[]), Some(Vec::new()));
        assert_eq!(decode(&bytes[..bytes.len() - 1]), None);
        let mut pushed = Vec::new();
        for item in &items {
            push(&mut pushed, |out| out.extend_from_slice(item));
        }
        assert_eq!(pushed, bytes, "an item written in place is encoded the same");
    }
}
