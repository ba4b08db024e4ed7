//! A tokio TCP server for the scenarios: `freebind-tokio-server ADDR:PORT` binds with
//! `tokio::net::TcpListener::bind` (which sets SO_REUSEADDR, then binds) and answers every
//! connection with one line.
use tokio::io::AsyncWriteExt as _;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .expect("usage: freebind-tokio-server ADDR:PORT");
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bind {addr}: {e}");
            std::process::exit(1);
        }
    };
    println!(
        "listening on {}",
        listener.local_addr().expect("local_addr")
    );
    loop {
        let Ok((mut conn, peer)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let _ = conn
                .write_all(format!("tokio ok {peer}\n").as_bytes())
                .await;
        });
    }
}
