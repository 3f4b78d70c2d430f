//! A FUSE filesystem for fault tests, in memory, with a disk's durability rules: written
//! data becomes durable only through fsync/fdatasync of its file, and a directory entry
//! (create, rename, unlink) only through fsync of its directory. [`FaultFs::power_cut`]
//! unmounts and throws away everything that was not made durable, as a power cut would;
//! [`FaultFs::mount`] then "boots" again on what survived.
//!
//! It can also be told to fail like a sick disk: ENOSPC past a capacity, EIO, EROFS.
//!
//! This is the strict reading of POSIX: ext4 or xfs often keep more (a new file's entry is
//! usually journalled with the file's own fsync), never less; code that survives here
//! survives there.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    TimeOrNow, WriteFlags,
};

/// How the disk misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Every write, create and sync answers EIO.
    Eio,
    /// Every change answers EROFS (a filesystem remounted read-only).
    ReadOnly,
    /// Only unlink (and rmdir) answers EIO; everything else works.
    UnlinkEio,
    /// Only reading file data answers EIO (a bad sector); writes and syncs work.
    ReadEio,
    /// Reads, writes, creates and syncs do not answer until the fault is cleared (a hung
    /// disk: an SD card retrying, a stuck USB bridge).
    Hang,
}

const BLOCK: u64 = 4096;
const TTL: Duration = Duration::from_secs(0);

#[derive(Debug, Clone)]
enum Node {
    File {
        live: Vec<u8>,
        durable: Vec<u8>,
        /// Byte ranges written since the last sync, as (start, end).
        dirty: Vec<(usize, usize)>,
    },
    Dir {
        live: BTreeMap<OsString, u64>,
        durable: BTreeMap<OsString, u64>,
    },
}

#[derive(Debug, Clone)]
struct Inode {
    node: Node,
    perm: u16,
}

#[derive(Debug)]
struct State {
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
    fault: Fault,
    /// Live bytes allowed before writes answer ENOSPC.
    capacity: u64,
    /// The power is off: writes still answer (a dying process would not notice), but
    /// nothing more becomes durable.
    frozen: bool,
    /// fsync/fdatasync calls on files, and on directories.
    file_syncs: u64,
    dir_syncs: u64,
    /// The power goes after this many more syncs (file or directory): the cut falls
    /// inside a sequence of syncs, not only between them.
    syncs_left: Option<u64>,
    /// Names whose unlink [`Fault::UnlinkEio`] refused, in order.
    refused_unlinks: Vec<OsString>,
}

impl State {
    fn new() -> State {
        let mut inodes = HashMap::new();
        inodes.insert(
            1,
            Inode {
                node: Node::Dir {
                    live: BTreeMap::new(),
                    durable: BTreeMap::new(),
                },
                perm: 0o755,
            },
        );
        State {
            inodes,
            next_ino: 2,
            fault: Fault::None,
            capacity: u64::MAX,
            frozen: false,
            file_syncs: 0,
            dir_syncs: 0,
            syncs_left: None,
            refused_unlinks: Vec::new(),
        }
    }

    fn used(&self) -> u64 {
        self.inodes
            .values()
            .map(|i| match &i.node {
                Node::File { live, .. } => live.len() as u64,
                Node::Dir { .. } => 0,
            })
            .sum()
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let i = self.inodes.get(&ino)?;
        let (kind, size) = match &i.node {
            Node::File { live, .. } => (FileType::RegularFile, live.len() as u64),
            Node::Dir { live, .. } => (FileType::Directory, live.len() as u64),
        };
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind,
            perm: i.perm,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: BLOCK as u32,
            flags: 0,
        })
    }

    fn dir(&mut self, ino: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match self.inodes.get_mut(&ino).map(|i| &mut i.node) {
            Some(Node::Dir { live, .. }) => Ok(live),
            Some(_) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn change(&self) -> Result<(), Errno> {
        match self.fault {
            Fault::None | Fault::UnlinkEio | Fault::ReadEio | Fault::Hang => Ok(()),
            Fault::Eio => Err(Errno::EIO),
            Fault::ReadOnly => Err(Errno::EROFS),
        }
    }

    fn add(&mut self, parent: u64, name: &OsStr, node: Node, perm: u16) -> Result<u64, Errno> {
        self.change()?;
        if self.dir(parent)?.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.inodes.insert(ino, Inode { node, perm });
        self.dir(parent)?.insert(name.to_os_string(), ino);
        Ok(ino)
    }

    /// fsync / fdatasync of a file (its data and size become durable) or of a
    /// directory (its entries do).
    fn sync(&mut self, ino: u64) -> Result<(), Errno> {
        if self.fault == Fault::Eio {
            return Err(Errno::EIO);
        }
        match self.syncs_left {
            Some(0) => self.frozen = true,
            Some(n) => self.syncs_left = Some(n - 1),
            None => {}
        }
        let frozen = self.frozen;
        let Some(i) = self.inodes.get_mut(&ino) else {
            return Err(Errno::ENOENT);
        };
        match &mut i.node {
            Node::File {
                live,
                durable,
                dirty,
            } => {
                self.file_syncs += 1;
                if !frozen {
                    durable.resize(live.len(), 0);
                    for (s, e) in dirty.drain(..) {
                        let e = e.min(live.len());
                        if s < e {
                            durable[s..e].copy_from_slice(&live[s..e]);
                        }
                    }
                }
            }
            Node::Dir { live, durable } => {
                self.dir_syncs += 1;
                if !frozen {
                    *durable = live.clone();
                }
            }
        }
        Ok(())
    }

    /// Everything not synced is gone; inodes no durable entry reaches are freed.
    fn power_cut(&mut self) {
        for i in self.inodes.values_mut() {
            match &mut i.node {
                Node::File {
                    live,
                    durable,
                    dirty,
                } => {
                    *live = durable.clone();
                    dirty.clear();
                }
                Node::Dir { live, durable } => *live = durable.clone(),
            }
        }
        let mut reachable = vec![1u64];
        let mut seen = std::collections::HashSet::new();
        while let Some(ino) = reachable.pop() {
            if !seen.insert(ino) {
                continue;
            }
            if let Some(Inode {
                node: Node::Dir { live, .. },
                ..
            }) = self.inodes.get(&ino)
            {
                reachable.extend(live.values().copied());
            }
        }
        self.inodes.retain(|ino, _| seen.contains(ino));
    }
}

/// The mounted filesystem's handle for the test.
#[derive(Clone)]
struct Shared(Arc<Mutex<State>>);

impl Shared {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut st = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut st)
    }

    /// Under [`Fault::Hang`], waits (without the state lock) until the fault is cleared,
    /// or 60 s at most: a test that fails while the disk hangs must not hang CI.
    fn wait_while_hung(&self) {
        let t0 = std::time::Instant::now();
        while self.with(|st| st.fault == Fault::Hang) && t0.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Filesystem for Shared {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = self.with(|st| {
            let ino = *st.dir(parent.0)?.get(name).ok_or(Errno::ENOENT)?;
            st.attr(ino).ok_or(Errno::ENOENT)
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.with(|st| st.attr(ino.0)) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
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
        let r = self.with(|st| {
            if mode.is_some() || size.is_some() {
                st.change()?;
            }
            let i = st.inodes.get_mut(&ino.0).ok_or(Errno::ENOENT)?;
            if let Some(m) = mode {
                i.perm = (m & 0o7777) as u16;
            }
            if let (Some(n), Node::File { live, dirty, .. }) = (size, &mut i.node) {
                let n = usize::try_from(n).map_err(|_| Errno::EFBIG)?;
                let old = live.len();
                live.resize(n, 0);
                if n > old {
                    dirty.push((old, n));
                }
            }
            st.attr(ino.0).ok_or(Errno::ENOENT)
        });
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let node = Node::Dir {
            live: BTreeMap::new(),
            durable: BTreeMap::new(),
        };
        let r = self.with(|st| {
            let ino = st.add(parent.0, name, node, (mode & 0o7777) as u16)?;
            st.attr(ino).ok_or(Errno::EIO)
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        self.wait_while_hung();
        let node = Node::File {
            live: Vec::new(),
            durable: Vec::new(),
            dirty: Vec::new(),
        };
        let r = self.with(|st| {
            let ino = st.add(parent.0, name, node, (mode & 0o7777) as u16)?;
            st.attr(ino).ok_or(Errno::EIO)
        });
        match r {
            Ok(a) => reply.created(
                &TTL,
                &a,
                Generation(0),
                FileHandle(0),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.with(|st| st.inodes.contains_key(&ino.0)) {
            reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
        } else {
            reply.error(Errno::ENOENT);
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
        self.wait_while_hung();
        let r = self.with(|st| match st.inodes.get(&ino.0).map(|i| &i.node) {
            Some(Node::File { .. }) if st.fault == Fault::ReadEio => Err(Errno::EIO),
            Some(Node::File { live, .. }) => {
                let start = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(live.len());
                let end = start.saturating_add(size as usize).min(live.len());
                Ok(live[start..end].to_vec())
            }
            Some(_) => Err(Errno::EISDIR),
            None => Err(Errno::ENOENT),
        });
        match r {
            Ok(d) => reply.data(&d),
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
        self.wait_while_hung();
        let r = self.with(|st| {
            st.change()?;
            let start = usize::try_from(offset).map_err(|_| Errno::EFBIG)?;
            let end = start.checked_add(data.len()).ok_or(Errno::EFBIG)?;
            let grow = match st.inodes.get(&ino.0).map(|i| &i.node) {
                Some(Node::File { live, .. }) => end.saturating_sub(live.len()) as u64,
                Some(_) => return Err(Errno::EISDIR),
                None => return Err(Errno::ENOENT),
            };
            if grow > 0 && st.used() + grow > st.capacity {
                return Err(Errno::ENOSPC);
            }
            if let Some(Inode {
                node: Node::File { live, dirty, .. },
                ..
            }) = st.inodes.get_mut(&ino.0)
            {
                if live.len() < end {
                    live.resize(end, 0);
                }
                live[start..end].copy_from_slice(data);
                dirty.push((start, end));
            }
            Ok(data.len() as u32)
        });
        match r {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) is not a durability point.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.wait_while_hung();
        match self.with(|st| st.sync(ino.0)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.wait_while_hung();
        match self.with(|st| st.sync(ino.0)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = self.with(|st| {
            let entries: Vec<(u64, OsString)> = st
                .dir(ino.0)?
                .iter()
                .map(|(n, i)| (*i, n.clone()))
                .collect();
            Ok::<_, Errno>(
                entries
                    .into_iter()
                    .map(|(i, n)| {
                        let kind = match st.inodes.get(&i).map(|x| &x.node) {
                            Some(Node::Dir { .. }) => FileType::Directory,
                            _ => FileType::RegularFile,
                        };
                        (i, kind, n)
                    })
                    .collect::<Vec<_>>(),
            )
        });
        match r {
            Ok(entries) => {
                let all = [
                    (ino.0, FileType::Directory, OsString::from(".")),
                    (ino.0, FileType::Directory, OsString::from("..")),
                ]
                .into_iter()
                .chain(entries);
                for (k, (i, kind, name)) in all.enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(i), (k + 1) as u64, kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.with(|st| {
            st.change()?;
            if st.fault == Fault::UnlinkEio {
                st.refused_unlinks.push(name.to_os_string());
                return Err(Errno::EIO);
            }
            st.dir(parent.0)?.remove(name).ok_or(Errno::ENOENT)?;
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.unlink(req, parent, name, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = self.with(|st| {
            st.change()?;
            let ino = st.dir(parent.0)?.remove(name).ok_or(Errno::ENOENT)?;
            st.dir(newparent.0)?.insert(newname.to_os_string(), ino);
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let (cap, used) = self.with(|st| (st.capacity.min(1 << 50), st.used()));
        let blocks = cap / BLOCK;
        let free = cap.saturating_sub(used) / BLOCK;
        reply.statfs(
            blocks,
            free,
            free,
            1 << 20,
            1 << 20,
            BLOCK as u32,
            255,
            BLOCK as u32,
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }
}

/// A mounted fault filesystem. Dropping it unmounts.
pub struct FaultFs {
    state: Shared,
    pub mountpoint: PathBuf,
    session: Option<BackgroundSession>,
    _dir: tempfile::TempDir,
}

impl FaultFs {
    /// Mounts a new, empty filesystem on a fresh directory. Panics (failing the test
    /// loudly) when FUSE is not available.
    pub fn new() -> FaultFs {
        let dir = tempfile::tempdir().expect("tempdir");
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint).expect("mountpoint");
        let mut fs = FaultFs {
            state: Shared(Arc::new(Mutex::new(State::new()))),
            mountpoint,
            session: None,
            _dir: dir,
        };
        fs.mount();
        fs
    }

    /// Mounts (again) on the state that survived.
    pub fn mount(&mut self) {
        assert!(self.session.is_none(), "already mounted");
        let mut cfg = Config::default();
        cfg.mount_options = vec![
            MountOption::FSName("labgate-faultfs".into()),
            MountOption::DefaultPermissions,
        ];
        let s = fuser::spawn_mount(self.state.clone(), &self.mountpoint, &cfg).unwrap_or_else(|e| {
            panic!(
                "cannot mount the FUSE fault filesystem on {} ({e}): needs /dev/fuse and fuse3 (scripts/test installs it)",
                self.mountpoint.display()
            )
        });
        self.session = Some(s);
        // The mount is live once the root answers.
        let t0 = std::time::Instant::now();
        while std::fs::read_dir(&self.mountpoint).is_err() && t0.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The moment of a power cut: from now on nothing becomes durable, though writes
    /// still answer. For code in the test's own process, which cannot be killed: freeze,
    /// drop it (its orderly close syncs, in vain), then [`FaultFs::power_cut`].
    pub fn freeze(&self) {
        self.state.with(|st| st.frozen = true);
    }

    /// [`FaultFs::freeze`] after the next `n` syncs: the `n + 1`th and every later
    /// one answer but make nothing durable.
    pub fn freeze_after_syncs(&self, n: u64) {
        self.state.with(|st| st.syncs_left = Some(n));
    }

    /// A power cut: freezes, unmounts, then forgets every write and directory change
    /// that was not synced. Processes using the filesystem must have been killed first.
    pub fn power_cut(&mut self) {
        self.freeze();
        if let Some(s) = self.session.take() {
            // A killed process's files are released asynchronously: retry while busy,
            // and detach lazily as the last resort.
            let mnt = self.mountpoint.display().to_string();
            let mut done = false;
            for _ in 0..100 {
                let ok = std::process::Command::new("umount")
                    .arg(&mnt)
                    .stderr(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if ok {
                    done = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if !done {
                let _ = std::process::Command::new("umount")
                    .args(["-l", &mnt])
                    .status();
            }
            // Unmounted: the session's thread ends when the kernel closes the channel.
            s.join().expect("the fault filesystem's thread");
        }
        self.state.with(|st| {
            st.power_cut();
            st.frozen = false;
            st.syncs_left = None;
        });
    }

    /// `path` inside the mount.
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.mountpoint.join(rel)
    }

    pub fn set_fault(&self, fault: Fault) {
        self.state.with(|st| st.fault = fault);
    }

    /// Writes that would take the live bytes past `bytes` answer ENOSPC.
    pub fn set_capacity(&self, bytes: u64) {
        self.state.with(|st| st.capacity = bytes);
    }

    /// Bytes of file data now on the filesystem.
    pub fn used(&self) -> u64 {
        self.state.with(|st| st.used())
    }

    /// Names whose unlink was refused under [`Fault::UnlinkEio`] so far.
    pub fn refused_unlinks(&self) -> Vec<OsString> {
        self.state.with(|st| st.refused_unlinks.clone())
    }

    /// (file syncs, directory syncs) seen so far.
    pub fn syncs(&self) -> (u64, u64) {
        self.state.with(|st| (st.file_syncs, st.dir_syncs))
    }
}

impl Drop for FaultFs {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = s.umount_and_join();
        }
    }
}

/// One test's brokers (tansu, mosquitto) and fault filesystem: the agent's data dir on
/// the fault filesystem, its config and log in an ordinary directory.
pub struct FaultRig {
    pub broker: super::Broker,
    pub mqtt: super::Mosquitto,
    pub topics: super::Topics,
    pub fs: FaultFs,
    pub dir: tempfile::TempDir,
}

impl FaultRig {
    pub fn new() -> FaultRig {
        FaultRig {
            broker: super::Broker::start(),
            mqtt: super::Mosquitto::start(),
            topics: super::Topics::new(),
            fs: FaultFs::new(),
            dir: super::tempdir(),
        }
    }

    /// Starts the agent with the extra config sections.
    pub fn start(&self, agent_id: &str, extra: &str) -> super::Agent {
        super::Agent::start(
            self.dir.path(),
            &super::agent_config(
                &self.fs.mountpoint,
                agent_id,
                &self.broker.addr(),
                &self.topics,
                super::free_port(),
                extra,
            ),
        )
    }

    /// Kill -9, cut the power, boot the filesystem, start the agent again.
    pub fn cut_and_restart(&mut self, agent: &mut super::Agent) {
        agent.kill9();
        self.fs.power_cut();
        self.fs.mount();
        agent.spawn();
    }
}
