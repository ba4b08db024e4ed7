use crate::paths::Paths;

pub fn run(_paths: &Paths, _args: &[String]) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
