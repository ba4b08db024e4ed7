//! Addresses as the bind hooks see them, classified once for both families.
use aya_ebpf::btf_maps::lpm_trie::Key;
use freebind_common::{parking, LocalAddrKey, AF_INET, AF_INET6};

use crate::maps::{ALLOW_V4, ALLOW_V6, LOCAL_ADDRS};

/// Stores `words` into a context's IPv6 field, word by word and volatile: LLVM otherwise
/// merges adjacent 32-bit context stores into 64-bit ones, which the verifier refuses
/// ("invalid bpf_context access").
///
/// # Safety
/// `field` must be a writable four-word IPv6 field of the program's context.
#[inline(always)]
pub unsafe fn store_ip6(field: *mut [u32; 4], words: [u32; 4]) {
    let f = field.cast::<u32>();
    unsafe {
        core::ptr::write_volatile(f, words[0]);
        core::ptr::write_volatile(f.add(1), words[1]);
        core::ptr::write_volatile(f.add(2), words[2]);
        core::ptr::write_volatile(f.add(3), words[3]);
    }
}

/// An address in network byte order; IPv4 (also when it arrived v4-mapped in a bind6)
/// occupies the first four bytes.
#[derive(Clone, Copy)]
pub struct Addr {
    pub bytes: [u8; 16],
    pub is_v4: bool,
}

impl Addr {
    /// `ip` is `bpf_sock_addr::user_ip4`: network byte order in memory.
    #[inline(always)]
    pub fn v4(ip: u32) -> Self {
        let b = ip.to_ne_bytes();
        let mut bytes = [0u8; 16];
        bytes[0] = b[0];
        bytes[1] = b[1];
        bytes[2] = b[2];
        bytes[3] = b[3];
        Self { bytes, is_v4: true }
    }

    /// The address as a context's IPv4 field (`user_ip4`, `msg_src_ip4`) holds it.
    #[inline(always)]
    pub fn ip4_word(&self) -> u32 {
        u32::from_ne_bytes(self.v4_bytes())
    }

    /// The address as the four words of a context's IPv6 field (`user_ip6`,
    /// `msg_src_ip6`); IPv4 becomes v4-mapped.
    #[inline(always)]
    pub fn ip6_words(&self) -> [u32; 4] {
        if self.is_v4 {
            return [0, 0, u32::from_be(0x0000_ffff), self.ip4_word()];
        }
        let b = &self.bytes;
        [
            u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
            u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
            u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
            u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
        ]
    }

    /// `ip` is `bpf_sock_addr::user_ip6`. A v4-mapped address (`::ffff:a.b.c.d`) becomes
    /// IPv4: that is what the kernel binds, so locality and policy are IPv4's — otherwise
    /// an IPv4 policy could be bypassed through an AF_INET6 socket.
    #[inline(always)]
    pub fn v6(ip: [u32; 4]) -> Self {
        if ip[0] == 0 && ip[1] == 0 && ip[2] == u32::from_be(0x0000_ffff) {
            return Self::v4(ip[3]);
        }
        let mut bytes = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let w = ip[i].to_ne_bytes();
            bytes[i * 4] = w[0];
            bytes[i * 4 + 1] = w[1];
            bytes[i * 4 + 2] = w[2];
            bytes[i * 4 + 3] = w[3];
            i += 1;
        }
        Self {
            bytes,
            is_v4: false,
        }
    }

    /// [`AF_INET`] or [`AF_INET6`]: the family of the address itself (IPv4 for v4-mapped).
    #[inline(always)]
    pub fn family(&self) -> u8 {
        if self.is_v4 {
            AF_INET
        } else {
            AF_INET6
        }
    }

    /// Equality word by word (a derived `==` on byte arrays may become a `bcmp` call, which
    /// BPF has no way to make).
    #[inline(always)]
    pub fn same(&self, other: &Addr) -> bool {
        let (a, b) = (self.ip6_words(), other.ip6_words());
        self.is_v4 == other.is_v4 && a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
    }

    /// Is this one of steer mode's parking addresses?
    #[inline(always)]
    pub fn is_parking(&self) -> bool {
        if self.is_v4 {
            parking::is_v4(&self.bytes)
        } else {
            parking::is_v6(&self.bytes)
        }
    }

    /// The key of this address in the maps keyed per network namespace.
    #[inline(always)]
    pub fn key(&self, netns_cookie: u64) -> LocalAddrKey {
        LocalAddrKey::new(netns_cookie, self.family(), self.bytes)
    }

    #[inline(always)]
    pub fn v4_bytes(&self) -> [u8; 4] {
        [self.bytes[0], self.bytes[1], self.bytes[2], self.bytes[3]]
    }

    /// Addresses the kernel accepts in `bind()` whatever the interfaces hold, or decides
    /// on by rules of its own: the wildcard and 0.0.0.0/8, loopback (all of 127.0.0.0/8 is local
    /// while `lo` is up), multicast and limited broadcast. freebind leaves them to the kernel.
    #[inline(always)]
    pub fn is_kernel_special(&self) -> bool {
        let b = &self.bytes;
        if self.is_v4 {
            // inet_addr_type() calls all of 0.0.0.0/8 broadcast, and so accepts it.
            let broadcast = b[0] == 255 && b[1] == 255 && b[2] == 255 && b[3] == 255;
            b[0] == 0 || broadcast || b[0] == 127 || (b[0] & 0xf0) == 0xe0
        } else {
            let mut head_zero = true;
            let mut i = 0;
            while i < 15 {
                head_zero &= b[i] == 0;
                i += 1;
            }
            // `::` and `::1`, or ff00::/8.
            (head_zero && (b[15] == 0 || b[15] == 1)) || b[0] == 0xff
        }
    }

    /// Is the address assigned (and usable: not tentative) in the socket's namespace?
    /// The agent keeps `LOCAL_ADDRS` from rtnetlink.
    #[inline(always)]
    pub fn is_local(&self, netns_cookie: u64) -> bool {
        let key = self.key(netns_cookie);
        // SAFETY: the value is only tested for presence, never read after a concurrent delete.
        unsafe { LOCAL_ADDRS.get(key) }.is_some()
    }

    /// Does the attachment's policy allow binding this address while it is not local?
    #[inline(always)]
    pub fn is_allowed(&self) -> bool {
        if self.is_v4 {
            ALLOW_V4.get(&Key::new(32, self.v4_bytes())).is_some()
        } else {
            ALLOW_V6.get(&Key::new(128, self.bytes)).is_some()
        }
    }
}
