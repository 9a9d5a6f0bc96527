"""Writing a checkpoint folder safely: no user file lost, no half-written checkpoint.

The rule (`check_target`, used by every writer: `save_pretrained`, `slice_checkpoint`, `train`):
a checkpoint is written into a folder that does not exist, is empty, or holds a checkpoint that
v4lens wrote, i.e. has a manifest `v4lens-checkpoint.json` listing the files v4lens wrote there.
Only those files (and the ones the new checkpoint writes) are replaced; a README, notes or
subfolders the user put beside them are left alone. Any other non-empty folder is refused with
FileExistsError unless `overwrite=True`, which replaces the files v4lens writes (OWNED below) and
still keeps every other file.

How (`writing_checkpoint`): every file is first written into a hidden folder `.v4lens-tmp-<random>`
inside the target and fsynced. Only then are the old checkpoint's files moved aside into
`.v4lens-old-<random>` (the manifest and config.json first) and the new ones moved in (config.json
and the manifest last), each by one rename within the folder. So at every instant the folder holds
the complete old checkpoint, the complete new one, or, during those few renames, weights without a
config.json, which no loader accepts: never a new config with old weights. Any exception (a full
disk, an interrupt, a failed rename) removes the temporary folder and puts the old files back, so
the target is left as it was. A process killed outright can leave the `.v4lens-*` folders (the old
one holds the previous checkpoint's files, for a person to recover); they are not counted as the
user's files by the next save, and never deleted by it.

The temporary folder lives inside the target rather than beside it so that the target folder keeps
its identity (a mount point, the working directory, a symlinked folder, its permissions), the
user's files never move, and only the target itself needs to be writable.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

MANIFEST = "v4lens-checkpoint.json"
# the files a v4lens checkpoint consists of: what overwrite=True may replace in a foreign folder
OWNED = re.compile(
    r"model.*\.safetensors|model\.safetensors\.index\.json|config\.json|slice\.json|" + re.escape(MANIFEST)
)
PRIVATE = ".v4lens-"  # prefix of this module's temporary and backup folders
_move = os.rename  # one atomic rename within a folder (a name to patch in tests)


def manifest_files(folder: str | Path) -> set[str] | None:
    """The file names the manifest in `folder` lists (with the manifest), or None when it has none readable."""
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, list):
        return None
    return {f for f in files if isinstance(f, str) and _plain(f)} | {MANIFEST}


def _plain(name: str) -> bool:
    """A bare file name: a manifest naming `../x` or `/etc/x` must not reach outside its folder."""
    return name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def check_target(path: str | Path, overwrite: bool = False, ours: Iterable[str] = ()) -> set[str]:
    """Raise unless a checkpoint may be written to the folder `path`; return the names there it replaces.

    ours: entries of the folder that the caller wrote itself (train's `step-N` checkpoints), which
    do not make the folder a foreign one. Raises NotADirectoryError (a file in the way),
    PermissionError (not writable), FileExistsError (a non-empty folder v4lens did not write).
    """
    path = Path(path)
    if os.path.lexists(path) and not path.exists():
        raise FileNotFoundError(f"cannot write a checkpoint to {path}: it is a broken symbolic link")
    if not path.exists():
        above = next(p for p in path.absolute().parents if p.exists())
        if not above.is_dir():
            raise NotADirectoryError(f"cannot write a checkpoint to {path}: {above} is a file, not a folder")
        _check_writable(above, path)
        return set()
    if not path.is_dir():
        raise NotADirectoryError(f"cannot write a checkpoint to {path}: it is a file, not a folder")
    _check_writable(path, path)
    names = {e.name for e in os.scandir(path)}
    theirs = sorted(n for n in names if not n.startswith(PRIVATE) and n not in set(ours))
    listed = manifest_files(path)
    if theirs and listed is None and not overwrite:
        shown = ", ".join(theirs[:5]) + (f", ... ({len(theirs)} entries)" if len(theirs) > 5 else "")
        raise FileExistsError(
            f"cannot write a checkpoint to {path}: the folder is not empty ({shown}) and is not a checkpoint "
            f"v4lens wrote (no {MANIFEST}). v4lens replaces only files it wrote. Choose a new or empty folder, "
            "or pass overwrite=True (--overwrite) to replace its model*.safetensors, model.safetensors.index.json, "
            "config.json and slice.json; its other files are kept."
        )
    replace = set(listed or ())
    if overwrite:
        replace |= {n for n in names if OWNED.fullmatch(n)}
    return replace & names


def _check_writable(folder: Path, path: Path) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write a checkpoint to {path}: {folder} is not writable")


def check_separate(src: str | Path, out: str | Path) -> None:
    """ValueError when the output folder `out` is the folder `src`, lies inside it, or contains it
    (symbolic links resolved): writing there would replace or bury the source's own files."""
    s, o = Path(src).resolve(), Path(out).resolve()
    same = o == s or (o.exists() and s.exists() and os.path.samefile(o, s))
    where = "is" if same else "lies inside" if s in o.parents else "contains" if o in s.parents else None
    if where is not None:
        shown_out, shown_src = (f"{p}" + (f" ({r})" if str(r) != str(p) else "") for p, r in ((out, o), (src, s)))
        raise ValueError(
            f"out {shown_out} {where} the source {shown_src}; writing the output there could replace the "
            "source's files. Choose an output folder outside the source."
        )


@contextmanager
def writing_checkpoint(path: str | Path, overwrite: bool = False, ours: Iterable[str] = ()) -> Iterator[Path]:
    """Yield an empty temporary folder to write a checkpoint's files into. On a clean exit they replace
    the checkpoint in `path` and a manifest listing them is added (module docstring); on an exception
    nothing in `path` changes, and folders this call created are removed again."""
    path, ours = Path(path), tuple(ours)
    check_target(path, overwrite, ours)
    created = [p for p in (path.absolute(), *path.absolute().parents) if not p.exists()][::-1]
    tmp = path / f"{PRIVATE}tmp-{secrets.token_hex(6)}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        yield tmp
        # checked again: the folder may have changed while the files were written
        _commit(path, tmp, check_target(path, overwrite, ours))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in reversed(created):  # innermost first; a folder someone filled meanwhile stays
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _commit(path: Path, tmp: Path, replace: set[str]) -> None:
    """Move the complete files in `tmp` into `path`, replacing `replace` (and same-named entries)."""
    new = sorted(p.name for p in tmp.iterdir())
    (tmp / MANIFEST).write_text(json.dumps({"written_by": "v4lens", "files": new}, indent=1) + "\n")
    for name in new + [MANIFEST]:
        fsync(tmp / name)
    fsync(tmp)
    names = {e.name for e in os.scandir(path)}
    away = sorted((replace | set(new) | {MANIFEST}) & names, key=lambda n: (n != MANIFEST, n != "config.json", n))
    into = sorted(new, key=lambda n: (n == "config.json", n)) + [MANIFEST]
    old = path / f"{PRIVATE}old-{secrets.token_hex(6)}"
    done: list[tuple[Path, Path]] = []
    try:
        old.mkdir()
        for name in away:  # the manifest and config.json first: no moment with a new config and old weights
            _move(path / name, old / name)
            done.append((path / name, old / name))
        for name in into:  # config.json and the manifest last: no moment with a config and missing weights
            _move(tmp / name, path / name)
            done.append((tmp / name, path / name))
        fsync(path)
    except BaseException as e:
        for src, dst in reversed(done):  # put everything back where it was
            try:
                _move(dst, src)
            except OSError as undo:
                raise OSError(
                    f"writing the checkpoint {path} failed ({e}), and putting its previous files back failed too "
                    f"({undo}): they are in {old}"
                ) from e
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)  # the replaced files
    tmp.rmdir()


def fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk, so a completed save survives a power cut."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder
        pass
    finally:
        os.close(fd)
