//! The writes to one file that no fsync has made durable yet.
//!
//! They live in whole pages over the backing file's durable content, the way
//! a page cache holds dirty pages; `sync` writes them out, and they vanish
//! with the process, which is the power loss this filesystem exists for.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

const PAGE: u64 = 4096;

pub struct Unsynced {
    pages: BTreeMap<u64, Box<[u8]>>,
    /// The file's size as its writers see it.
    size: u64,
    /// Bytes of the backing file at or past this offset are gone (a
    /// truncation not yet synced): they read as zeros.
    durable_end: u64,
}

impl Unsynced {
    /// Nothing unsynced over a backing file of `size` bytes.
    pub fn new(size: u64) -> Unsynced {
        Unsynced { pages: BTreeMap::new(), size, durable_end: size }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn write(&mut self, backing: &File, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut done = 0;
        while done < data.len() {
            let at = offset + done as u64;
            let (number, within) = (at / PAGE, (at % PAGE) as usize);
            let n = (PAGE as usize - within).min(data.len() - done);
            self.page_mut(backing, number)?[within..within + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        self.size = self.size.max(offset + data.len() as u64);
        Ok(())
    }

    pub fn read(&self, backing: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let end = self.size.min(offset.saturating_add(len as u64));
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        let mut at = offset;
        while at < end {
            let (number, within) = (at / PAGE, (at % PAGE) as usize);
            let n = (PAGE - within as u64).min(end - at) as usize;
            match self.pages.get(&number) {
                Some(page) => out.extend_from_slice(&page[within..within + n]),
                None => out.extend_from_slice(&self.durable_page(backing, number)?[within..within + n]),
            }
            at += n as u64;
        }
        Ok(out)
    }

    pub fn truncate(&mut self, backing: &File, size: u64) -> io::Result<()> {
        if size < self.size {
            self.pages.retain(|&number, _| number * PAGE < size);
            if !size.is_multiple_of(PAGE) {
                // The tail of the page that now ends the file must read as
                // zeros should the file grow again.
                let within = (size % PAGE) as usize;
                self.page_mut(backing, size / PAGE)?[within..].fill(0);
            }
            self.durable_end = self.durable_end.min(size);
        }
        self.size = size;
        Ok(())
    }

    /// Makes everything durable in `backing` (fdatasync included).
    pub fn sync(&mut self, backing: &File) -> io::Result<()> {
        if self.durable_end < backing.metadata()?.len() {
            backing.set_len(self.durable_end)?;
        }
        for (&number, page) in &self.pages {
            let start = number * PAGE;
            let n = (self.size - start).min(PAGE) as usize;
            backing.write_all_at(&page[..n], start)?;
        }
        backing.set_len(self.size)?;
        backing.sync_data()?;
        self.pages.clear();
        self.durable_end = self.size;
        Ok(())
    }

    fn page_mut(&mut self, backing: &File, number: u64) -> io::Result<&mut [u8]> {
        if !self.pages.contains_key(&number) {
            let page = self.durable_page(backing, number)?;
            self.pages.insert(number, page);
        }
        Ok(self.pages.get_mut(&number).expect("inserted"))
    }

    /// Page `number` as the backing file holds it, zeros past its durable end.
    fn durable_page(&self, backing: &File, number: u64) -> io::Result<Box<[u8]>> {
        let mut page = vec![0; PAGE as usize].into_boxed_slice();
        let start = number * PAGE;
        let len = self.durable_end.saturating_sub(start).min(PAGE) as usize;
        let mut filled = 0;
        while filled < len {
            match backing.read_at(&mut page[filled..len], start + filled as u64)? {
                0 => break,
                n => filled += n,
            }
        }
        Ok(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backing(content: &[u8]) -> File {
        let file = tempfile::tempfile().unwrap();
        file.write_all_at(content, 0).unwrap();
        file
    }

    fn durable(file: &File) -> Vec<u8> {
        Unsynced::new(file.metadata().unwrap().len()).read(file, 0, 1 << 20).unwrap()
    }

    #[test]
    fn writes_are_visible_but_not_durable_until_synced() {
        let file = backing(b"hello world");
        let mut unsynced = Unsynced::new(11);
        unsynced.write(&file, 6, b"there, friend").unwrap();
        assert_eq!(unsynced.read(&file, 0, 100).unwrap(), b"hello there, friend");
        assert_eq!(durable(&file), b"hello world");
        unsynced.sync(&file).unwrap();
        assert_eq!(durable(&file), b"hello there, friend");
    }

    #[test]
    fn writes_across_pages_and_holes() {
        let file = backing(b"");
        let mut unsynced = Unsynced::new(0);
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        unsynced.write(&file, 3000, &data).unwrap();
        let read = unsynced.read(&file, 0, 20_000).unwrap();
        assert_eq!(read.len(), 13_000);
        assert!(read[..3000].iter().all(|&b| b == 0));
        assert_eq!(&read[3000..], &data[..]);
        unsynced.sync(&file).unwrap();
        assert_eq!(durable(&file), read);
    }

    #[test]
    fn a_truncation_is_lazy_and_what_it_cut_reads_as_zeros() {
        let file = backing(&[7; 10_000]);
        let mut unsynced = Unsynced::new(10_000);
        unsynced.truncate(&file, 5000).unwrap();
        assert_eq!(unsynced.size(), 5000);
        unsynced.write(&file, 9000, b"x").unwrap();
        let read = unsynced.read(&file, 0, 20_000).unwrap();
        assert_eq!(read.len(), 9001);
        assert!(read[..5000].iter().all(|&b| b == 7));
        assert!(read[5000..9000].iter().all(|&b| b == 0));
        assert_eq!(durable(&file), vec![7; 10_000]);
        unsynced.sync(&file).unwrap();
        assert_eq!(durable(&file), read);
    }
}
