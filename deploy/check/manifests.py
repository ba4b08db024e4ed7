"""Checks for deploy/, run by tests/tests/deploy_manifests.rs in its virtual environment.

  manifests.py kubernetes VERSION[,VERSION...] FILE...
      Parses every YAML document of each FILE (duplicate keys are an error, not a silent
      override), validates each against the Kubernetes JSON schemas that
      kubernetes-validate bundles, strictly (unknown fields are errors), for each VERSION,
      and prints the documents as one JSON list of {"file", "doc"}.
  manifests.py toml FILE
      Parses FILE (- for standard input) as TOML and prints it as JSON.

Failures go to stderr, one line each, and the exit status is 1.
"""

import json
import sys
import tomllib

import kubernetes_validate
import yaml


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; YAML says a mapping's keys are unique."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def kubernetes(versions, files):
    failures, out = [], []
    for path in files:
        with open(path, encoding="utf-8") as f:
            try:
                docs = [d for d in yaml.load_all(f, Loader=UniqueKeyLoader) if d is not None]
            except yaml.YAMLError as e:
                failures.append(f"{path}: {e}".replace("\n", " "))
                continue
        for doc in docs:
            name = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
            for version in versions:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    where = ".".join(str(p) for p in e.path) or "(top)"
                    failures.append(f"{path}: {name} against {version}: {where}: {e.message}")
                except (
                    kubernetes_validate.SchemaNotFoundError,
                    kubernetes_validate.VersionNotSupportedError,
                    kubernetes_validate.InvalidSchemaError,
                ) as e:
                    failures.append(f"{path}: {name} against {version}: {e.message}")
            out.append({"file": path, "doc": doc})
    return failures, out


def main(argv):
    if len(argv) >= 3 and argv[0] == "kubernetes":
        failures, out = kubernetes(argv[1].split(","), argv[2:])
    elif len(argv) == 2 and argv[0] == "toml":
        failures, out = [], None
        try:
            if argv[1] == "-":
                out = tomllib.load(sys.stdin.buffer)
            else:
                with open(argv[1], "rb") as f:
                    out = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            failures.append(f"{argv[1]}: {e}")
    else:
        print(__doc__, file=sys.stderr)
        return 2
    for failure in failures:
        print(failure, file=sys.stderr)
    if failures:
        return 1
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
