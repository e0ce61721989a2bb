//! A passthrough filesystem over a backing directory that holds file writes
//! in memory until fsync. Names (create, mkdir, rename, unlink) reach the
//! backing directory at once: what power loss takes is unsynced data, the
//! failure the durability of a log depends on.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use crate::unsynced::Unsynced;

/// The kernel caches nothing: every size and byte comes from here, so what
/// a reader sees after a power loss is what was synced.
const TTL: Duration = Duration::ZERO;

pub struct LazyFs {
    root: PathBuf,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Inode → path relative to the root ("" is the root).
    paths: HashMap<u64, PathBuf>,
    inodes: HashMap<PathBuf, u64>,
    /// Files with a backing handle open, and their unsynced writes.
    files: HashMap<u64, OpenFile>,
    /// Numbers are never reused: the kernel may still hold a forgotten one.
    next_ino: u64,
}

struct OpenFile {
    backing: File,
    unsynced: Unsynced,
}

type Result<T> = std::result::Result<T, Errno>;

impl LazyFs {
    pub fn new(root: PathBuf) -> LazyFs {
        let mut state = State::default();
        state.paths.insert(INodeNo::ROOT.0, PathBuf::new());
        state.inodes.insert(PathBuf::new(), INodeNo::ROOT.0);
        state.next_ino = INodeNo::ROOT.0 + 1;
        LazyFs { root, state: Mutex::new(state) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn backing(&self, relative: &Path) -> PathBuf {
        self.root.join(relative)
    }

    /// The attributes of `relative`, numbering it if it is new.
    fn entry(&self, state: &mut State, relative: PathBuf) -> Result<FileAttr> {
        let metadata = fs::symlink_metadata(self.backing(&relative))?;
        let ino = state.ino(relative);
        Ok(state.attr(ino, &metadata))
    }

    fn child(&self, state: &State, parent: INodeNo, name: &OsStr) -> Result<PathBuf> {
        Ok(state.path(parent)?.join(name))
    }

    fn open_file<'a>(&self, state: &'a mut State, ino: INodeNo) -> Result<&'a mut OpenFile> {
        if !state.files.contains_key(&ino.0) {
            let path = self.backing(state.path(ino)?);
            let backing = OpenOptions::new().read(true).write(true).open(&path)?;
            let size = backing.metadata()?.len();
            state.files.insert(ino.0, OpenFile { backing, unsynced: Unsynced::new(size) });
        }
        Ok(state.files.get_mut(&ino.0).expect("inserted"))
    }

    fn getattr_(&self, ino: INodeNo) -> Result<FileAttr> {
        let state = &mut *self.state();
        let metadata = fs::symlink_metadata(self.backing(state.path(ino)?))?;
        Ok(state.attr(ino.0, &metadata))
    }

    fn setattr_(&self, ino: INodeNo, mode: Option<u32>, size: Option<u64>) -> Result<FileAttr> {
        let state = &mut *self.state();
        let path = self.backing(state.path(ino)?);
        if let Some(mode) = mode {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
        }
        if let Some(size) = size {
            let file = self.open_file(state, ino)?;
            file.unsynced.truncate(&file.backing, size)?;
        }
        let metadata = fs::symlink_metadata(&path)?;
        Ok(state.attr(ino.0, &metadata))
    }

    fn create_(&self, parent: INodeNo, name: &OsStr, mode: u32, flags: i32) -> Result<FileAttr> {
        let state = &mut *self.state();
        let relative = self.child(state, parent, name)?;
        let mut options = OpenOptions::new();
        options.read(true).write(true).mode(mode);
        if flags & libc::O_EXCL != 0 {
            options.create_new(true);
        } else {
            options.create(true);
        }
        options.open(self.backing(&relative))?;
        self.entry(state, relative)
    }

    fn mkdir_(&self, parent: INodeNo, name: &OsStr, mode: u32) -> Result<FileAttr> {
        let state = &mut *self.state();
        let relative = self.child(state, parent, name)?;
        let path = self.backing(&relative);
        fs::create_dir(&path)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
        self.entry(state, relative)
    }

    fn remove(&self, parent: INodeNo, name: &OsStr, directory: bool) -> Result<()> {
        let state = &mut *self.state();
        let relative = self.child(state, parent, name)?;
        let path = self.backing(&relative);
        if directory {
            fs::remove_dir(path)?
        } else {
            fs::remove_file(path)?
        }
        state.forget(&relative);
        Ok(())
    }

    fn rename_(&self, parent: INodeNo, name: &OsStr, newparent: INodeNo, newname: &OsStr) -> Result<()> {
        let state = &mut *self.state();
        let from = self.child(state, parent, name)?;
        let to = self.child(state, newparent, newname)?;
        fs::rename(self.backing(&from), self.backing(&to))?;
        state.forget(&to);
        state.moved(&from, &to);
        Ok(())
    }

    fn read_(&self, ino: INodeNo, offset: u64, size: u32) -> Result<Vec<u8>> {
        let state = &mut *self.state();
        let file = self.open_file(state, ino)?;
        Ok(file.unsynced.read(&file.backing, offset, size as usize)?)
    }

    fn write_(&self, ino: INodeNo, offset: u64, data: &[u8]) -> Result<()> {
        let state = &mut *self.state();
        let file = self.open_file(state, ino)?;
        Ok(file.unsynced.write(&file.backing, offset, data)?)
    }

    fn fsync_(&self, ino: INodeNo) -> Result<()> {
        let state = &mut *self.state();
        if let Some(file) = state.files.get_mut(&ino.0) {
            file.unsynced.sync(&file.backing)?;
        }
        Ok(())
    }

    fn readdir_(&self, ino: INodeNo, offset: u64, reply: &mut ReplyDirectory) -> Result<()> {
        let state = &mut *self.state();
        let relative = state.path(ino)?.to_path_buf();
        let mut entries = vec![(ino.0, FileType::Directory, ".".into()), (ino.0, FileType::Directory, "..".into())];
        let mut listed: Vec<_> = fs::read_dir(self.backing(&relative))?.collect::<io::Result<_>>()?;
        listed.sort_by_key(|entry| entry.file_name());
        for entry in listed {
            let kind = FileType::from_std(entry.file_type()?).unwrap_or(FileType::RegularFile);
            let child = state.ino(relative.join(entry.file_name()));
            entries.push((child, kind, entry.file_name()));
        }
        for (i, (child, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                break;
            }
        }
        Ok(())
    }
}

impl State {
    fn path(&self, ino: INodeNo) -> Result<&Path> {
        self.paths.get(&ino.0).map(PathBuf::as_path).ok_or(Errno::ENOENT)
    }

    fn ino(&mut self, relative: PathBuf) -> u64 {
        if let Some(&ino) = self.inodes.get(&relative) {
            return ino;
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.paths.insert(ino, relative.clone());
        self.inodes.insert(relative, ino);
        ino
    }

    /// `relative` is gone, and with it any unsynced data of the file.
    fn forget(&mut self, relative: &Path) {
        if let Some(ino) = self.inodes.remove(relative) {
            self.paths.remove(&ino);
            self.files.remove(&ino);
        }
    }

    /// `from` (and, for a directory, everything under it) is now `to`.
    fn moved(&mut self, from: &Path, to: &Path) {
        let moved: Vec<(PathBuf, u64)> =
            self.inodes.iter().filter(|(path, _)| path.starts_with(from)).map(|(p, &i)| (p.clone(), i)).collect();
        for (old, ino) in moved {
            // Not `to.join("")` for `from` itself: that adds a trailing
            // slash, and the backing file's path would then fail with ENOTDIR.
            let rest = old.strip_prefix(from).expect("filtered");
            let new = if rest.as_os_str().is_empty() { to.to_path_buf() } else { to.join(rest) };
            self.inodes.remove(&old);
            self.inodes.insert(new.clone(), ino);
            self.paths.insert(ino, new);
        }
    }

    fn attr(&self, ino: u64, metadata: &Metadata) -> FileAttr {
        let size = self.files.get(&ino).map_or(metadata.len(), |file| file.unsynced.size());
        let time = |secs: i64, nanos: i64| SystemTime::UNIX_EPOCH + Duration::new(secs.max(0) as u64, nanos as u32);
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: time(metadata.atime(), metadata.atime_nsec()),
            mtime: time(metadata.mtime(), metadata.mtime_nsec()),
            ctime: time(metadata.ctime(), metadata.ctime_nsec()),
            crtime: SystemTime::UNIX_EPOCH,
            kind: FileType::from_std(metadata.file_type()).unwrap_or(FileType::RegularFile),
            perm: (metadata.mode() & 0o7777) as u16,
            nlink: metadata.nlink() as u32,
            uid: metadata.uid(),
            gid: metadata.gid(),
            rdev: metadata.rdev() as u32,
            blksize: 4096,
            flags: 0,
        }
    }
}

fn reply_entry(reply: ReplyEntry, result: Result<FileAttr>) {
    match result {
        Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
        Err(e) => reply.error(e),
    }
}

fn reply_attr(reply: ReplyAttr, result: Result<FileAttr>) {
    match result {
        Ok(attr) => reply.attr(&TTL, &attr),
        Err(e) => reply.error(e),
    }
}

fn reply_empty(reply: ReplyEmpty, result: Result<()>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

impl Filesystem for LazyFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let state = &mut *self.state();
        reply_entry(reply, self.child(state, parent, name).and_then(|relative| self.entry(state, relative)));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply_attr(reply, self.getattr_(ino));
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply_attr(reply, self.setattr_(ino, mode, size));
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        reply_entry(reply, self.mkdir_(parent, name, mode & !umask));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.remove(parent, name, false));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.remove(parent, name, true));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if !flags.is_empty() {
            return reply.error(Errno::EINVAL);
        }
        reply_empty(reply, self.rename_(parent, name, newparent, newname));
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.getattr_(ino) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.create_(parent, name, mode & !umask, flags) {
            Ok(attr) => reply.created(&TTL, &attr, Generation(0), FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.read_(ino, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.write_(ino, offset, data) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // close() makes nothing durable.
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply_empty(reply, self.fsync_(ino));
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        match self.readdir_(ino, offset, &mut reply) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // Names are durable as soon as they change.
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let path = std::ffi::CString::new(self.root.as_os_str().as_encoded_bytes()).expect("no NUL in a path");
        let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: a valid C string and a statvfs to fill.
        if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
            return reply.error(io::Error::last_os_error().into());
        }
        reply.statfs(
            stat.f_blocks,
            stat.f_bfree,
            stat.f_bavail,
            stat.f_files,
            stat.f_ffree,
            stat.f_bsize as u32,
            stat.f_namemax as u32,
            stat.f_frsize as u32,
        );
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply_empty(reply, self.getattr_(ino).map(|_| ()));
    }
}
