use crate::paths::Paths;

pub fn run(_paths: &Paths) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
