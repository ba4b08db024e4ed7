//! freebind's eBPF programs: one module per hook, the maps they share defined here.
#![no_std]
#![no_main]

mod addr;
mod bind;
mod maps;
mod sendmsg;
mod setsockopt;
mod sock;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects any path that could get here.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
