//! Download buffers: [`AlignedBuf`], whose start is aligned for O_DIRECT, and the
//! [`BufPool`] that hands the same few of them round for a whole image.

/// Block size for zero detection and the alignment of direct writes.
pub const BLOCK: u64 = 4096;

/// A buffer whose start is aligned for O_DIRECT, without unsafe code: a Vec with room to
/// spare, used from its first aligned byte. Download buffers are of this kind too, so the
/// sink can write whole aligned blocks straight from them without copying.
#[derive(Debug)]
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
    cap: usize,
}

impl AlignedBuf {
    /// No storage (a placeholder while the real buffer is borrowed out).
    pub(super) fn empty() -> AlignedBuf {
        AlignedBuf {
            storage: Vec::new(),
            start: 0,
            len: 0,
            cap: 0,
        }
    }

    pub fn new(cap: usize, align: usize) -> AlignedBuf {
        let storage = vec![0u8; cap + align];
        let start = storage.as_ptr().align_offset(align).min(align);
        AlignedBuf {
            storage,
            start,
            len: 0,
            cap,
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    pub fn room(&self) -> usize {
        self.cap - self.len
    }

    /// The unused room after the content, for reading into; [`AlignedBuf::advance`] then
    /// counts what was put there.
    pub fn spare_mut(&mut self) -> &mut [u8] {
        let at = self.start + self.len;
        &mut self.storage[at..self.start + self.cap]
    }

    /// Counts `n` more bytes, put in [`AlignedBuf::spare_mut`], as content.
    pub fn advance(&mut self, n: usize) {
        self.len = (self.len + n).min(self.cap);
    }

    /// Appends `data`, which must fit in [`AlignedBuf::room`].
    pub fn push(&mut self, data: &[u8]) {
        let at = self.start + self.len;
        self.storage[at..at + data.len()].copy_from_slice(data);
        self.len += data.len();
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}
/// Download buffers, handed back by the writer for the next chunk: the same few buffers go
/// round, so a multi-GiB image costs no fresh pages (page faults were a tenth of the CPU).
/// They are aligned, so the sink writes raw data straight from them.
#[derive(Clone, Default)]
pub struct BufPool(std::sync::Arc<std::sync::Mutex<Vec<AlignedBuf>>>);

impl BufPool {
    /// An empty aligned buffer of exactly `cap` bytes.
    pub fn get(&self, cap: usize) -> AlignedBuf {
        let reused = self.0.lock().ok().and_then(|mut p| p.pop());
        match reused {
            Some(mut v) if v.capacity() == cap => {
                v.clear();
                v
            }
            _ => AlignedBuf::new(cap, BLOCK as usize),
        }
    }

    /// How many buffers wait for reuse.
    #[cfg(test)]
    pub fn kept(&self) -> usize {
        self.0.lock().map(|p| p.len()).unwrap_or(0)
    }

    /// Returns a buffer (at most 16 are kept).
    pub fn put(&self, v: AlignedBuf) {
        if let Ok(mut p) = self.0.lock()
            && p.len() < 16
        {
            p.push(v);
        }
    }
}
