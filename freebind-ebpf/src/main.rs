//! freebind's eBPF programs: one module per hook, the maps they share defined here.
#![no_std]
#![no_main]

mod addr;
mod bind;
mod connect;
mod getsockname;
mod iter;
mod maps;
mod park;
mod sendmsg;
mod setsockopt;
mod sk_lookup;
mod sock;
mod sock_ops;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects any path that could get here.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
