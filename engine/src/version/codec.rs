//! Bounds-checked little-endian reading for the decoders; it never panics on short input.

/// The input ended before a field did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Truncated {
    pub needed: usize,
    pub available: usize,
}

/// A cursor over untrusted bytes.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, position: 0 }
    }

    pub fn position(&self) -> usize {
        self.position
    }

    pub fn remaining(&self) -> usize {
        self.bytes.len().saturating_sub(self.position)
    }

    /// Fails unless at least `needed` bytes remain.
    pub fn ensure(&self, needed: usize) -> Result<(), Truncated> {
        let available = self.remaining();
        if needed > available {
            return Err(Truncated { needed, available });
        }
        Ok(())
    }

    pub fn take(&mut self, needed: usize) -> Result<&'a [u8], Truncated> {
        self.ensure(needed)?;
        let taken = self
            .bytes
            .get(self.position..self.position + needed)
            .ok_or(Truncated {
                needed,
                available: self.remaining(),
            })?;
        self.position += needed;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Truncated> {
        let mut array = [0u8; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }

    pub fn u8(&mut self) -> Result<u8, Truncated> {
        Ok(self.array::<1>()?[0])
    }

    pub fn u16(&mut self) -> Result<u16, Truncated> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub fn u32(&mut self) -> Result<u32, Truncated> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64, Truncated> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}
