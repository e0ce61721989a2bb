//! CURVE keys: the Z85 text of public and secret keys, key pairs, and the
//! key files `raft-zmq keygen` writes. The config names keys, and the
//! socket setup in `security` uses them; neither is needed to read one.

use std::ffi::{CString, c_char, c_int};
use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The Z85 alphabet (ZeroMQ RFC 32), in digit order.
const Z85: &[u8; 85] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#";
/// A 32-byte key is 40 Z85 characters.
const Z85_KEY_CHARS: usize = 40;

/// A CURVE public key: a node's or a client's identity on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    pub fn from_bytes(bytes: [u8; 32]) -> PublicKey {
        PublicKey(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parses the Z85 text of a key, as found in a `.pub` file or the config.
    pub fn parse(text: &str) -> Result<PublicKey, String> {
        decode_key(text).map(PublicKey)
    }

    /// A `--server-key` argument: the Z85 text of a key, or a `.pub` file.
    pub fn from_text_or_file(arg: &str) -> Result<PublicKey, String> {
        if let Ok(key) = PublicKey::parse(arg) {
            return Ok(key);
        }
        let text = fs::read_to_string(arg)
            .map_err(|e| format!("{arg:?} is neither a Z85 public key nor a readable .pub file ({e})"))?;
        PublicKey::parse(text.trim_end()).map_err(|e| format!("{arg}: {e}"))
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&z85(&self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// A key pair: who this process is on CURVE connections.
#[derive(Clone)]
pub struct CurveIdentity {
    public: PublicKey,
    secret: [u8; 32],
}

impl CurveIdentity {
    /// A fresh key pair (an ephemeral client, or `raft-zmq keygen`).
    pub fn generate() -> zmq::Result<CurveIdentity> {
        let pair = zmq::CurveKeyPair::new()?;
        Ok(CurveIdentity { public: PublicKey(pair.public_key), secret: pair.secret_key })
    }

    /// Reads a secret key file written by `raft-zmq keygen`; the public key
    /// is derived from it, so a `.pub` file beside it is not needed. A file
    /// other users may read or write is refused, as ssh refuses one: the
    /// key may be theirs already.
    pub fn load(path: &Path) -> Result<CurveIdentity, String> {
        let mode = fs::metadata(path).map(|m| m.permissions().mode() & 0o777).unwrap_or(0);
        if mode & 0o077 != 0 {
            return Err(format!(
                "secret key {} is open to other users (mode {mode:04o}); run `chmod 600 {}`",
                path.display(),
                path.display()
            ));
        }
        let text = fs::read_to_string(path).map_err(|e| format!("cannot read secret key {}: {e}", path.display()))?;
        let secret = decode_key(text.trim_end()).map_err(|e| format!("{}: not a secret key: {e}", path.display()))?;
        let public =
            public_of(&secret).map_err(|e| format!("{}: cannot derive its public key: {e}", path.display()))?;
        Ok(CurveIdentity { public, secret })
    }

    pub fn public(&self) -> PublicKey {
        self.public
    }

    /// For the socket options only: never logged, never sent.
    pub(crate) fn secret(&self) -> &[u8; 32] {
        &self.secret
    }

    /// `raft-zmq keygen NAME`: writes `NAME.key` (the Z85 secret key, mode
    /// 0600) and `NAME.pub` (the Z85 public key), one line each, creating
    /// missing folders. Refuses if either file exists.
    pub fn write_new(name: &Path) -> Result<CurveIdentity, String> {
        let with_extension = |extension: &str| {
            let mut path = name.as_os_str().to_owned();
            path.push(extension);
            PathBuf::from(path)
        };
        let (secret_path, public_path) = (with_extension(".key"), with_extension(".pub"));
        for path in [&secret_path, &public_path] {
            // symlink_metadata: a dangling link is in the way too.
            if path.symlink_metadata().is_ok() {
                return Err(format!("{} already exists; not overwriting it", path.display()));
            }
        }
        if let Some(folder) = name.parent().filter(|folder| !folder.as_os_str().is_empty()) {
            fs::create_dir_all(folder).map_err(|e| format!("cannot create {}: {e}", folder.display()))?;
        }
        let identity = CurveIdentity::generate().map_err(|e| format!("cannot generate a CURVE key pair: {e}"))?;
        write_line(&secret_path, 0o600, &z85(&identity.secret))?;
        if let Err(e) = write_line(&public_path, 0o644, &identity.public.to_string()) {
            // Half a key pair is worse than none: a rerun would refuse.
            let _ = fs::remove_file(&secret_path);
            return Err(e);
        }
        Ok(identity)
    }
}

/// Never prints the secret key.
impl fmt::Debug for CurveIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CurveIdentity({})", self.public)
    }
}

/// Creates `path` (never over an existing file) holding `text` and a newline.
fn write_line(path: &Path, mode: u32, text: &str) -> Result<(), String> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    writeln!(file, "{text}").map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn z85(key: &[u8; 32]) -> String {
    zmq::z85_encode(key).expect("32 bytes are a whole number of Z85 groups")
}

/// Strict Z85 decoding of a 32-byte key. `zmq::z85_decode` is not used:
/// it maps characters outside the alphabet to arbitrary bytes, and a typo in
/// a key must be an error, not somebody else's key.
fn decode_key(text: &str) -> Result<[u8; 32], String> {
    let digits: Vec<u64> = text
        .chars()
        .map(|c| Z85.iter().position(|&z| char::from(z) == c).map(|d| d as u64))
        .collect::<Option<_>>()
        .ok_or("contains a character outside the Z85 alphabet")?;
    if digits.len() != Z85_KEY_CHARS {
        return Err(format!("must be {Z85_KEY_CHARS} Z85 characters, not {}", digits.len()));
    }
    let mut key = [0; 32];
    for (group, bytes) in digits.chunks(5).zip(key.chunks_mut(4)) {
        let value = group.iter().fold(0, |value, digit| value * 85 + digit);
        let value = u32::try_from(value).map_err(|_| "is not valid Z85 (a group exceeds 32 bits)")?;
        bytes.copy_from_slice(&value.to_be_bytes());
    }
    Ok(key)
}

// Neither the zmq crate nor zmq-sys exposes zmq_curve_public (libzmq
// 4.2+); the library is linked anyway (.cargo/config.toml).
unsafe extern "C" {
    fn zmq_curve_public(z85_public_key: *mut c_char, z85_secret_key: *const c_char) -> c_int;
}

/// The public key that belongs to `secret`, computed by libzmq.
fn public_of(secret: &[u8; 32]) -> Result<PublicKey, zmq::Error> {
    let secret = CString::new(z85(secret)).expect("Z85 has no NUL");
    let mut public = [0u8; Z85_KEY_CHARS + 1];
    // SAFETY: libzmq reads the NUL-terminated 40-character Z85 `secret` and
    // writes 40 Z85 characters plus a NUL into `public`, which has room for them.
    let rc = unsafe { zmq_curve_public(public.as_mut_ptr().cast(), secret.as_ptr()) };
    if rc != 0 {
        // Its only failure with a well-formed key: no CURVE in this libzmq.
        return Err(zmq::Error::ENOTSUP);
    }
    let text = std::str::from_utf8(&public[..Z85_KEY_CHARS]).expect("libzmq writes Z85");
    Ok(PublicKey::parse(text).expect("libzmq writes a valid key"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key pair from libzmq's CURVE documentation (zmq_curve(7)).
    const DOC_PUBLIC: &str = "Yne@$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hID";
    const DOC_SECRET: &str = "D:)Q[IlAW!ahhC2ac:9*A}h:p?([4%wOTJ%JR%cs";

    #[test]
    fn libzmq_supports_curve() {
        assert_eq!(
            zmq::has("curve"),
            Some(true),
            "this libzmq has no CURVE: install Debian's libzmq3-dev (built with libsodium; \
             `apt-get install --no-install-recommends libzmq3-dev`) and rebuild"
        );
    }

    #[test]
    fn z85_keys_round_trip_and_typos_are_refused() {
        let key = PublicKey::parse(DOC_PUBLIC).unwrap();
        assert_eq!(key.to_string(), DOC_PUBLIC);
        assert_eq!(decode_key(&z85(&[0xff; 32])), Ok([0xff; 32]));
        assert_eq!(decode_key(&DOC_PUBLIC[1..]), Err("must be 40 Z85 characters, not 39".into()));
        assert_eq!(decode_key(""), Err("must be 40 Z85 characters, not 0".into()));
        let typo = DOC_PUBLIC.replace('Y', "~");
        assert_eq!(decode_key(&typo), Err("contains a character outside the Z85 alphabet".into()));
        assert_eq!(decode_key(&"é".repeat(40)), Err("contains a character outside the Z85 alphabet".into()));
        // "%nSc1" is 2^32, one more than four bytes hold.
        assert!(decode_key(&format!("%nSc1{}", &DOC_PUBLIC[5..])).unwrap_err().contains("exceeds 32 bits"));
    }

    #[test]
    fn the_public_key_is_derived_from_the_secret_key() {
        assert_eq!(public_of(&decode_key(DOC_SECRET).unwrap()).unwrap().to_string(), DOC_PUBLIC);
        let fresh = CurveIdentity::generate().unwrap();
        assert_eq!(public_of(&fresh.secret).unwrap(), fresh.public);
    }

    #[test]
    fn server_key_is_z85_text_or_a_pub_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.pub");
        fs::write(&file, format!("{DOC_PUBLIC}\n")).unwrap();
        let expected = PublicKey::parse(DOC_PUBLIC).unwrap();
        assert_eq!(PublicKey::from_text_or_file(DOC_PUBLIC), Ok(expected));
        assert_eq!(PublicKey::from_text_or_file(file.to_str().unwrap()), Ok(expected));
        let missing = dir.path().join("missing.pub");
        let error = PublicKey::from_text_or_file(missing.to_str().unwrap()).unwrap_err();
        assert!(error.contains("neither a Z85 public key nor a readable .pub file"), "{error}");
    }

    #[test]
    fn a_secret_key_file_open_to_other_users_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let written = CurveIdentity::write_new(&dir.path().join("node")).unwrap();
        let path = dir.path().join("node.key");
        let shown = path.display();
        for mode in [0o640, 0o604, 0o620, 0o602] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let error = CurveIdentity::load(&path).unwrap_err();
            assert_eq!(
                error,
                format!("secret key {shown} is open to other users (mode {mode:04o}); run `chmod 600 {shown}`")
            );
        }
        for mode in [0o600, 0o400] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(CurveIdentity::load(&path).unwrap().public, written.public, "mode {mode:o}");
        }
    }

    #[test]
    fn key_files_hold_one_z85_line_each_and_are_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let name = dir.path().join("a/b/node0");
        let written = CurveIdentity::write_new(&name).unwrap();
        let secret = fs::read_to_string(dir.path().join("a/b/node0.key")).unwrap();
        let public = fs::read_to_string(dir.path().join("a/b/node0.pub")).unwrap();
        assert_eq!((secret.len(), public.len()), (41, 41));
        assert_eq!(public, format!("{}\n", written.public));
        let mode = fs::metadata(dir.path().join("a/b/node0.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(CurveIdentity::load(&dir.path().join("a/b/node0.key")).unwrap().public, written.public);

        let error = CurveIdentity::write_new(&name).unwrap_err();
        assert!(error.ends_with("node0.key already exists; not overwriting it"), "{error}");
        fs::remove_file(dir.path().join("a/b/node0.key")).unwrap();
        let error = CurveIdentity::write_new(&name).unwrap_err();
        assert!(error.ends_with("node0.pub already exists; not overwriting it"), "{error}");
        assert_eq!(fs::read_to_string(dir.path().join("a/b/node0.pub")).unwrap(), public, "left alone");
        assert!(!dir.path().join("a/b/node0.key").exists(), "no half pair written");
    }
}
