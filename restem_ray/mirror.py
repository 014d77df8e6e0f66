"""A run directory on object storage (`--out s3://bucket/runs/x`, or any `pyarrow.fs` URI).

The driver works on a node-local copy of the run directory, exactly as on a local one (`RUN_CACHE/<sha of the
URI>/<its last name>`; RUN_CACHE is `$RESTEM_RUN_CACHE`, default `~/.cache/restem-ray/runs`), and mirrors it to
the URI at every commit: each manifest write (`RunDir._write_manifest`, RunDir's commit point) is followed by a
`push`, which uploads the files that changed since the last push first and `manifest.json` last, so the
remote manifest never lists a phase whose files are not all there (an object store shows an object whole or
not at all). Files already uploaded and unchanged (same size and mtime, recorded in the local copy's
`.mirror-state.json`, which is never uploaded) are not sent again: samples shards and HF checkpoints go up once.

E-step shards do not wait for their commit (an E-step may run for hours): each goes up as soon as it is written
(`push_file`), outside the commit order. The remote manifest does not list them, so a run resumed elsewhere
treats them as a resumed E-step treats the shards on its disk: kept, and not sampled again.

`--resume` on a machine whose copy is missing or behind the remote (a new node, a RayJob retried elsewhere)
downloads the remote run directory first, uncommitted E-step shards included; a local copy that holds
everything the remote manifest lists (the same machine, after a crash) is kept, with its own uncommitted
shards, and gets the remote's uncommitted shards it lacks. One driver per URI: the node-local copy's flock
(`.driver.lock`) on this machine, and a lease object beside the run across machines (`hold`, restem_ray/lease.py).
Symbolic links (`RUN/best`) are not mirrored; the manifest's `best_iteration` says the same.
"""
from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import uuid
from pathlib import Path

from .data import durable_replace, fsync_tree, whole_parquet
from .errors import RunError, UserError, first_line, shown_uri
from .lease import NAME as LEASE
from .lease import DriverLease
from .observability import TRACKING_FILE
from .storage import written_by_a_driver as _driver_config

STATE = ".mirror-state.json"
REPORTED = re.compile(r"manifest\.json|metrics\.jsonl|config\.yaml|iter_\d+/problems\.parquet")  # report's reads
LOCAL_ONLY = {".driver.lock", STATE, LEASE}  # the lease lives on the remote only
MANIFEST = "manifest.json"
# files that vouch for others, uploaded after them: a folder whole (training.FINISHED), the dashboards' files (the
# record of what each dashboard took, restem_ray/observability.py)
MARKERS = {"restem_mstep.json", TRACKING_FILE}
BUCKET_STORES = ("s3", "gcs")  # file systems whose first path component is a bucket; they have no real folders
SHARD = re.compile(r"iter_(\d+)/samples/part-[^/]+\.parquet")  # an E-step shard (restem_ray/storage.py)


def run_cache_root() -> Path:
    if os.environ.get("RESTEM_RUN_CACHE"):
        return Path(os.environ["RESTEM_RUN_CACHE"])
    return Path(os.environ.get("RESTEM_CACHE", Path.home() / ".cache" / "restem-ray")) / "runs"


class RunMirror:
    def __init__(self, uri: str, cache: str | Path | None = None, what: str = "--out"):
        # `uri` opens the store (it may carry credentials); `self.uri` is what messages, names and the cache show
        self._uri, self.uri, self.what = uri.rstrip("/"), shown_uri(uri).rstrip("/"), what
        key = hashlib.sha256(self.uri.encode()).hexdigest()[:16]
        name = self.uri.rstrip("/").rsplit("/", 1)[-1] or "run"
        # the last name is kept: the M-step's Ray Train run is named after it, the same on every machine
        self.local = Path(cache or run_cache_root()) / key / name
        self.fs = self.path = None
        self.lease = None  # DriverLease once `hold` made this the run's driver

    # --- checks, before any cluster work ------------------------------------------------------
    def _open(self):
        if self.fs is None:
            import pyarrow.fs as pafs

            try:
                self.fs, self.path = pafs.FileSystem.from_uri(self._uri)
            except Exception as e:  # unknown scheme, malformed URI
                raise UserError(f"{self.what} {self.uri}: cannot open ({first_line(e, self._uri)})") from None
            self.path = self.path.rstrip("/")
        return self.fs

    def _info(self, path: str):
        try:
            return self._open().get_file_info(path)
        except UserError:
            raise
        except Exception as e:  # bad credentials, unreachable endpoint
            raise UserError(f"{self.what} {self.uri}: cannot open ({first_line(e, self._uri)})") from None

    def check(self, write: bool = True) -> bool:
        """One line if the URI cannot hold a run directory (cannot be opened, no such bucket, a file there, not
        writable); returns whether it holds a run (a manifest.json)."""
        import pyarrow.fs as pafs

        fs = self._open()
        if fs.type_name in BUCKET_STORES:
            bucket = self.path.split("/", 1)[0]
            if self._info(bucket).type != pafs.FileType.Directory:
                raise UserError(f"{self.what} {self.uri}: bucket {bucket!r} not found")
        info = self._info(self.path)
        if info.type == pafs.FileType.File:
            raise UserError(f"{self.what} {self.uri}: is a file, not a run directory")
        has_run = self._info(f"{self.path}/{MANIFEST}").type == pafs.FileType.File
        if not write:
            return has_run
        probe = f"{self.path}/.restem-write-test-{uuid.uuid4().hex[:8]}"  # two drivers starting together
        try:  # what the first commit will do, now: a store that takes no writes fails before the cluster work
            if fs.type_name not in BUCKET_STORES:
                fs.create_dir(self.path, recursive=True)
            with fs.open_output_stream(probe) as f:
                f.write(b"ok")
            fs.delete_file(probe)
        except Exception as e:
            raise UserError(f"{self.what} {self.uri}: not writable ({first_line(e, self._uri)})") from None
        return has_run

    def check_cluster(self) -> None:
        """The working copy lives on the driver's node, and the M-step's workers and the sampler replicas read the
        iteration's data and checkpoints from it: on a cluster of several nodes it must be a folder every node
        mounts (RESTEM_RUN_CACHE, checked from every node), else one line now rather than a missing file in a worker
        later."""
        import ray

        alive = sum(1 for n in ray.nodes() if n.get("Alive"))
        if alive > 1 and not os.environ.get("RESTEM_RUN_CACHE"):
            raise UserError(f"{self.what} {self.uri}: the cluster has {alive} nodes, and the run directory's working "
                            f"copy ({self.local}) is on this one only; set RESTEM_RUN_CACHE to a folder every node "
                            "mounts (e.g. /shared/restem-runs), or give --out a shared path")
        if alive > 1:  # set, but is it shared? a marker written here, read from every other node
            from .resources import check_run_dir_on_every_node

            check_run_dir_on_every_node(self.local, not_shared=lambda local, missing, nodes: (
                f"RESTEM_RUN_CACHE {os.environ['RESTEM_RUN_CACHE']}: {len(missing)} of the cluster's {nodes} nodes "
                f"do not see it (e.g. {missing[0]}), and {self.uri}'s working copy ({local}) is in it; set it to a "
                "folder every node mounts (e.g. /shared/restem-runs)"))

    def _remote_manifest(self) -> dict | None:
        try:
            with self._open().open_input_stream(f"{self.path}/{MANIFEST}") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except Exception as e:
            raise UserError(f"{self.what} {self.uri}/{MANIFEST}: cannot read ({first_line(e, self._uri)})") from None

    def _check_not_locked(self) -> None:
        lock = self.local / ".driver.lock"
        if not lock.is_file():
            return
        with open(lock, "rb+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = f.read().decode(errors="replace").strip() or "unknown"
                raise UserError(f"{self.uri}: another driver is running this run ({holder}); wait for it to end "
                                "or stop it, then --resume") from None
            fcntl.flock(f, fcntl.LOCK_UN)

    def hold(self) -> None:
        """Become the run's one driver: refuse if a driver on this machine runs it (flock) or one anywhere holds
        its lease (restem_ray/lease.py; may watch a silent lease for 3 renewals first), else hold the lease
        until this process ends."""
        self._check_not_locked()
        self.lease = DriverLease(self._open(), self.path, self.uri, self._open().type_name in BUCKET_STORES)
        try:
            self.lease.acquire()
        except UserError:
            raise
        except Exception as e:  # the store failing between the checks and the lease
            raise UserError(f"{self.what} {self.uri}: cannot hold the driver lease ({first_line(e, self._uri)})") from None

    def prepare(self, resume: bool, has_run: bool) -> None:
        """Make the local copy the run's working directory: downloaded on a resume when missing or behind the
        remote one; emptied for a new run (the remote holds none: whatever is cached is stale)."""
        self._check_not_locked()
        if not resume:
            if has_run:
                raise UserError(f"{self.uri}: run directory already holds a run (use --resume to continue it)")
            if self.unpushed_run():  # a run committed here whose push failed: not ours to delete
                raise UserError(f"{self.uri}: this machine's copy of it ({self.local}) holds a run not yet pushed; "
                                "--resume continues it, or remove that folder to start anew")
            stale = self._local_manifest() is not None  # pushed, and removed from the store since: a stale copy
            self._check_empty()
            if self.local.exists():
                shutil.rmtree(self.local)
            if stale:
                print(f"[restem] {self.uri} no longer holds the run this machine pushed there; a new run starts "
                      f"(its local copy {self.local} was removed)", flush=True)
            return
        remote = self._remote_manifest() if has_run else None
        local = self._local_manifest()
        if remote is None:
            if local is None:
                raise UserError(f"{self.uri}: nothing to resume (no manifest.json)")
            if MANIFEST in _read_state(self.local):
                # this copy did push its manifest, and the remote has none now (removed, expired): what the
                # state file says was uploaded is gone too, so all of it goes up again at the next commit
                print(f"[restem] warning: {self.uri} no longer holds the run this machine pushed there; "
                      "its local copy is uploaded again whole", flush=True)
                _write_state(self.local, {})
            return  # committed here, not yet pushed (the push failed): the local copy is the run
        if (local is not None and local.get("created") == remote.get("created")
                and all(local["completed"].get(k) == v for k, v in remote["completed"].items())):
            # this machine's copy of the same run holds all the remote one does (and maybe finished shards)
            self._fill_shards(local)
            return
        self.pull()

    def unpushed_run(self) -> bool:
        """This machine's copy holds a run whose manifest never reached the store (its first push failed): only
        here, so `--auto-resume` continues it. A copy whose manifest did go up, where the store holds no run now,
        is of a run removed from the store: not brought back."""
        return self._local_manifest() is not None and MANIFEST not in _read_state(self.local)

    def report_copy(self) -> Path:
        """What `report` reads of the run as the store holds it (manifest, metrics, per-problem tables: a few MB,
        not its checkpoints and samples, tens of GB for a 7B run) in a folder of its own beside the working copy,
        where the report's own files are written."""
        import pyarrow.fs as pafs

        dst = self.local.with_name(self.local.name + ".report")
        shutil.rmtree(dst, ignore_errors=True)
        try:
            fs = self._open()
            for info in fs.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True)):
                rel = info.path[len(self.path) + 1:]
                if info.type == pafs.FileType.File and REPORTED.fullmatch(rel):
                    (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                    with fs.open_input_stream(info.path) as src, open(dst / rel, "wb") as out:
                        shutil.copyfileobj(src, out, 8 << 20)
        except Exception as e:
            raise UserError(f"{self.what} {self.uri}: cannot download the run's metrics ({first_line(e, self._uri)})") from None
        return dst

    def _check_empty(self) -> None:
        """A new run's prefix holds nothing yet (but the lease and write probes): a prefix with other files would
        have its config.yaml written over, and an earlier run's shards there taken for this run's. Only its top
        level is listed (a folder there is another's): at a bucket's root, a recursive listing is the bucket."""
        import pyarrow.fs as pafs

        try:
            infos = self._open().get_file_info(pafs.FileSelector(self.path, recursive=False, allow_not_found=True))
        except Exception as e:
            raise UserError(f"{self.what} {self.uri}: cannot list it ({first_line(e, self._uri)})") from None
        other = sorted(i.base_name + ("/" if i.type == pafs.FileType.Directory else "") for i in infos
                       if i.type == pafs.FileType.Directory or (i.type == pafs.FileType.File and not i.base_name.endswith(".tmp")
                                                                and not i.base_name.startswith((LEASE, ".restem-write-test-"))))
        if other == ["config.yaml"] and _driver_config(self._read_text("config.yaml")):
            return  # a start that died before its manifest went up (the same push sends config.yaml first)
        if other:
            raise UserError(f"{self.what} {self.uri}: not empty ({', '.join(other[:3])}{', ...' if len(other) > 3 else ''})"
                            " and holds no run: give a new or empty prefix as the run directory")

    def _read_text(self, rel: str) -> str:
        try:
            with self._open().open_input_stream(f"{self.path}/{rel}") as f:
                return f.read().decode("utf-8", errors="replace")
        except Exception:
            return ""

    def _fill_shards(self, local: dict) -> None:
        """Download the remote's E-step shards of iterations not yet sampled here that this copy lacks (written
        by a driver on another machine since this copy was made): the resumed E-step does not sample them again."""
        import pyarrow.fs as pafs

        try:
            infos = self._open().get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True))
        except Exception as e:
            raise UserError(f"{self.what} {self.uri}: cannot list the run directory ({first_line(e, self._uri)})") from None
        state, n = _read_state(self.local), 0
        for info in infos:
            rel = info.path[len(self.path) + 1:]
            m = SHARD.fullmatch(rel)
            if (info.type != pafs.FileType.File or m is None or f"{int(m[1])}/generate" in local["completed"]
                    or (self.local / rel).exists() or (rel in state and state[rel][0] == info.size)):
                continue  # in state: this copy uploaded it and removed it since; the next push deletes it
            dst = self.local / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(dst.name + ".tmp")
            try:
                with self.fs.open_input_stream(info.path) as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, 8 << 20)
                    out.flush()
                    os.fsync(out.fileno())  # (the state file below vouches for it: on disk first)
            except Exception as e:
                tmp.unlink(missing_ok=True)
                raise UserError(f"{self.what} {self.uri}/{rel}: cannot download ({first_line(e, self._uri)})") from None
            if not whole_parquet(tmp):  # cut off by an older version's upload: sampled again, not adopted
                tmp.unlink(missing_ok=True)
                print(f"[restem] warning: {self.uri}/{rel} is not a whole Parquet file; its problems are sampled "
                      "again", flush=True)
                continue
            durable_replace(tmp, dst)
            st = dst.stat()
            state[rel], n = [st.st_size, st.st_mtime_ns], n + 1  # it is on the remote as it is here
        if n:
            _write_state(self.local, state)
            print(f"[restem] downloaded {n} E-step shard(s) another machine finished from {self.uri}")

    def _local_manifest(self) -> dict | None:
        try:
            return json.loads((self.local / MANIFEST).read_text())
        except (OSError, ValueError):
            return None

    # --- transfers ----------------------------------------------------------------------------
    def pull(self) -> None:
        """Replace the local copy with the remote run directory (what `push` mirrors: an earlier version's
        uploaded Ray Train storage, `mstep-*`, stays on the store)."""
        import pyarrow.fs as pafs

        tmp = self.local.with_name(self.local.name + ".download")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        print(f"[restem] downloading the run directory {self.uri} to {self.local}")

        def download(rel: str) -> None:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            with self.fs.open_input_stream(f"{self.path}/{rel}") as src, open(tmp / rel, "wb") as out:
                shutil.copyfileobj(src, out, 8 << 20)

        try:
            infos = self._open().get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True))
            wanted = [rel for rel in (i.path[len(self.path) + 1:] for i in infos if i.type == pafs.FileType.File)
                      if _mirrored(rel)]
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                list(pool.map(download, wanted))
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"{self.what} {self.uri}: cannot download the run directory ({first_line(e, self._uri)})") from None
        try:  # (the remote's lease and a stray state file are not `_mirrored`: not downloaded)
            committed = json.loads((tmp / MANIFEST).read_text()).get("completed", {})
        except (OSError, ValueError):
            committed = {}
        for rel, _ in list(_local_files(tmp)):  # shards of an E-step not yet committed: adopted only whole
            m = SHARD.fullmatch(rel)
            if m and f"{int(m[1])}/generate" not in committed and not whole_parquet(tmp / rel):
                (tmp / rel).unlink()
                print(f"[restem] warning: {self.uri}/{rel} is not a whole Parquet file; its problems are sampled "
                      "again", flush=True)
        state = {rel: sig for rel, sig in _local_files(tmp)}  # all of them are on the remote as they are here
        _write_state(tmp, state)
        fsync_tree(tmp)  # a crash after the rename must not leave a torn checkpoint the state file vouches for
        shutil.rmtree(self.local, ignore_errors=True)
        durable_replace(tmp, self.local)

    def push(self) -> None:
        """Upload what changed since the last push, then manifest.json, then delete what the run removed."""
        if self.lease is not None:
            self.lease.check()  # a driver another one took the run from writes nothing more
        state = _read_state(self.local)
        files = dict(_local_files(self.local))
        changed = [rel for rel, sig in files.items() if rel != MANIFEST and state.get(rel) != sig]
        # A finished M-step's marker (restem_mstep.json) vouches for the weights beside it, as the manifest does for
        # the phases: it goes in a second wave, once they are all up (locally one rename shows them together)
        waves = [[r for r in changed if r.rsplit("/", 1)[-1] not in MARKERS],
                 [r for r in changed if r.rsplit("/", 1)[-1] in MARKERS]]
        again = {rel for rel in changed if rel in state}  # on the store already: replaced, never cut off
        try:
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                for wave in waves:
                    for rel, sent in zip(wave, pool.map(lambda r: self._upload(r, r in again), wave)):
                        if sent:  # the size/mtime before the upload: a file that grew meanwhile goes again
                            state[rel] = files[rel]
            if MANIFEST in files and state.get(MANIFEST) != files[MANIFEST]:
                if self.lease is not None:
                    self.lease.check()  # again: the uploads above may have taken minutes (a checkpoint)
                self._upload(MANIFEST, MANIFEST in state)  # last: the remote manifest never lists a phase whose
                # files are missing
                state[MANIFEST] = files[MANIFEST]
            gone = [r for r in state if r not in files]
            if gone and self.lease is not None:
                self.lease.check()
            for rel in gone:
                try:
                    self._open().delete_file(f"{self.path}/{rel}")
                except FileNotFoundError:
                    pass
                del state[rel]
        except RunError:  # the lease was taken meanwhile: its own one line
            raise
        except Exception as e:
            raise RunError(f"run directory {self.uri}: upload failed ({first_line(e, self._uri)}); the local copy "
                           f"{self.local} holds the run: --resume on this machine continues it") from None
        finally:
            _write_state(self.local, state)

    def push_file(self, rel: str) -> None:
        """Upload one finished file now, outside the commit order (an E-step shard: its commit may be hours
        away). The remote manifest does not list it until the commit. A failure only warns: the commit sends the
        file again, and stops the run if the store still takes nothing."""
        if self.lease is not None and not self.lease.check(strict=False):
            print(f"[restem] warning: could not read the driver lease at {self.uri}; {rel} goes with the next "
                  "commit", flush=True)
            return
        try:
            st = os.stat(self.local / rel)
        except FileNotFoundError:
            return
        state, sig = _read_state(self.local), [st.st_size, st.st_mtime_ns]
        if state.get(rel) == sig:
            return
        try:
            sent = self._upload(rel, rel in state)
        except Exception as e:
            print(f"[restem] warning: could not upload {rel} to {self.uri} ({first_line(e, self._uri)}); the next commit "
                  "sends it", flush=True)
            return
        if sent:
            state[rel] = sig
            _write_state(self.local, state)

    def _upload(self, rel: str, replacing: bool = False) -> bool:
        """Upload one file. `replacing`: the store holds an earlier version (manifest.json, metrics.jsonl at every
        commit), which an upload cut off must leave as it is: it goes to a temporary name, then moves."""
        fs, dst = self._open(), f"{self.path}/{rel}"
        try:
            src = open(self.local / rel, "rb")
        except FileNotFoundError:  # removed since the walk (a dashboard's own temporary files)
            return False
        local_store = fs.type_name not in BUCKET_STORES
        if local_store:  # real folders, and no atomic object writes: a temporary name, then a rename
            fs.create_dir(dst.rsplit("/", 1)[0], recursive=True)
        # (a replaced object over 1 GiB, a retrained checkpoint's shard, goes directly: S3's server-side copy, which
        # the move is, takes 5 GiB at most; the ones rewritten at every commit are small)
        replacing = replacing and os.fstat(src.fileno()).st_size <= 1 << 30
        tmp = dst + ".tmp" if local_store or replacing else dst
        copied = False
        try:
            with src, fs.open_output_stream(tmp) as out:
                shutil.copyfileobj(src, out, 8 << 20)
                copied = True
        except BaseException:
            # An object store completes an upload at close(), which the `with` runs on any way out (a SystemExit
            # from SIGTERM where Ray handles it, too): what was sent so far would stand under the file's real name,
            # and a resume elsewhere would take it for a finished shard. (A SIGKILL never closes: nothing shows.)
            # An upload whose close() failed sent nothing: the object there, if any, is the last good one.
            # A replaced object's upload went to a temporary name: the store's copy is the last good one, kept.
            if not local_store and (not copied or tmp != dst):
                try:
                    fs.delete_file(tmp)
                except Exception:
                    pass
            raise
        if tmp != dst:
            fs.move(tmp, dst)  # (on S3 and GCS a copy on the store, then a delete)
        return True


def _local_files(root: Path):
    """(relative path, [size, mtime_ns]) of every regular file to mirror: not the lock or the mirror state, not
    temporary names (written, then renamed), not symbolic links, not Ray Train's storage of an M-step
    (`mstep-*` folders: every rank's DeepSpeed state, about 100 GB for a 7B model; a run that wants it on the
    store sets `training.storage_path` there) nor a checkpoint being assembled (`checkpoint.tmp`)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not _local_folder(d)]
        for name in filenames:
            if _local_file(name):
                continue
            p = os.path.join(dirpath, name)
            try:
                st = os.lstat(p)
            except FileNotFoundError:  # removed while we walked (a dashboard's own files)
                continue
            if stat.S_ISREG(st.st_mode):
                yield os.path.relpath(p, root).replace(os.sep, "/"), [st.st_size, st.st_mtime_ns]


def _local_folder(name: str) -> bool:
    return name.startswith("mstep-") or name.endswith(".tmp")


def _local_file(name: str) -> bool:
    # (.probation: an E-step shard not yet judged, restem_ray/driver.py; uploaded once it is one)
    return name in LOCAL_ONLY or name.endswith((".tmp", ".probation")) or ".tmp." in name


def _mirrored(rel: str) -> bool:
    """Whether `push` mirrors the file at `rel` (as `_local_files` walks them)."""
    *folders, name = rel.split("/")
    return not _local_file(name) and not any(map(_local_folder, folders))


def _read_state(root: Path) -> dict:
    try:
        return json.loads((root / STATE).read_text())
    except (OSError, ValueError):
        return {}


def _write_state(root: Path, state: dict) -> None:
    tmp = root / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, sort_keys=True))
    os.replace(tmp, root / STATE)
