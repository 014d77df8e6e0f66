"""Extract the ray.io/v1 OpenAPI schemas from KubeRay's CRDs into tests/data/kuberay/ (gzipped JSON), so
the manifest tests run offline on a fresh clone.

    python scripts/vendor_kuberay_schemas.py ../shared/kuberay-crds

Source: ray-project/kuberay, ray-operator/config/crd/bases/ (Apache-2.0).
"""
import gzip
import json
import sys
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "kuberay"


def v1_schema(crd_file: Path) -> dict:
    crd = yaml.safe_load(crd_file.read_text())
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def main(src: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for kind, name in (("RayCluster", "rayclusters"), ("RayJob", "rayjobs")):
        schema = v1_schema(Path(src) / f"ray.io_{name}.yaml")
        data = json.dumps(schema, sort_keys=True).encode()
        (OUT / f"{name}.v1.schema.json.gz").write_bytes(gzip.compress(data, mtime=0))
        print(f"{kind}: {len(data)} bytes of schema -> {OUT / f'{name}.v1.schema.json.gz'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/kuberay-crds")
