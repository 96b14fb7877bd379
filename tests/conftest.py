import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Modules that launch process groups, longest first (their durations on the 2-core CI machine,
# about 50-210 s each): pytest-xdist hands out whole files (--dist loadfile) in collection order
# (--no-loadscope-reorder: not by their number of tests), so starting with the longest keeps both
# workers busy to the end (longest-processing-time first) instead of leaving one file running
# alone while the other worker idles.
LONGEST_FIRST = ("test_runtime_parity.py", "test_runtime_faults.py", "test_moe.py", "test_runtime_hf.py",
                 "test_runtime_profiles.py", "test_contract_property.py", "test_runtime_resume.py", "test_profiler.py",
                 "test_graph_pricing.py", "test_module_map.py", "test_input_fuzz.py", "test_runtime_lora.py",
                 "test_generate.py", "test_runtime_comm.py", "test_reports.py", "test_cli_simulate.py",
                 "test_check_command.py", "test_planner.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: order within a file kept
