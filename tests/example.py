"""The end-to-end example (docs/examples/train_mhc.py) as a module the tests can import."""
import importlib.util
import pathlib

_path = pathlib.Path(__file__).resolve().parents[1] / "docs" / "examples" / "train_mhc.py"
_spec = importlib.util.spec_from_file_location("train_mhc", _path)
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)

MHCModel, ResidualStack, main = _mod.MHCModel, _mod.ResidualStack, _mod.main
