"""eraser.zoo.machine: the record of which machine trained a checkpoint."""
from __future__ import annotations

import json

import torch

from eraser.zoo import machine
from eraser.zoo.train import TrainLog

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) CPU @ 2.20GHz
flags\t\t: fpu avx2

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
"""


def test_cpuinfo_reads_the_first_processor(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    info = machine._cpuinfo(str(path))
    assert info["vendor_id"] == "GenuineIntel" and info["model name"] == "Intel(R) Xeon(R) CPU @ 2.20GHz"
    assert info["flags"] == "fpu avx2"
    assert machine._cpuinfo(str(tmp_path / "missing")) == {}


def test_machine_info_is_json_ready_and_names_this_machine(monkeypatch, tmp_path):
    info = machine.machine_info()
    assert set(info) == {"cpu", "vendor", "arch", "torch", "cpu_capability", "threads"}
    assert info["torch"] == torch.__version__ and info["threads"] == torch.get_num_threads()
    assert json.loads(json.dumps(info)) == info
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    monkeypatch.setattr(machine, "CPUINFO", str(path))
    assert machine.machine_info()["cpu"] == "Intel(R) Xeon(R) CPU @ 2.20GHz"
    assert machine.machine_info()["vendor"] == "GenuineIntel"


def test_train_log_carries_the_machine():
    log = TrainLog({"main": 3}, {"main": 0.5}, 1.0, 10, {"cpu": "x"})
    assert log.to_dict()["machine"] == {"cpu": "x"}
    assert TrainLog({}, {}, 0.0, 0).to_dict()["machine"] == {}
