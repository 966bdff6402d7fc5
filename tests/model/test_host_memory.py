"""page_out (host_memory.py) hands a mapped weight file's pages back to the kernel and changes no value.

Whether the kernel then drops the pages is the platform's business (its version, swap, load):
what deltatune promises, and this tests, is that no tensor's contents change, whatever memory
it advises on.
"""

import torch
from safetensors.torch import load_file, save_file

from deltatune.model import host_memory

MB = 1 << 20


def test_page_out_keeps_every_value_of_mapped_written_and_anonymous_memory(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.arange(4 * MB, dtype=torch.float32)}, str(path))  # 16 MB
    mapped = load_file(str(path))["w"]
    expected = float(torch.arange(4 * MB, dtype=torch.float64).sum())
    assert float(mapped.double().sum()) == expected  # every page read
    host_memory.page_out([mapped])
    assert float(mapped.double().sum()) == expected  # faulted in again from the file
    anonymous = torch.randn(MB)
    copy = anonymous.clone()
    mapped[:1000] = -1  # a written page of the mapping
    host_memory.page_out([anonymous, mapped, torch.empty(0)])
    assert torch.equal(anonymous, copy) and float(mapped[:1000].sum()) == -1000
    assert float(mapped[1000:].double().sum()) == expected - float(torch.arange(1000, dtype=torch.float64).sum())
