"""The two weight hashes every audit cache and journal keys on (engine.model.network_files)."""
import hashlib

import torch

from engine.model.network_files import file_sha1, state_dict_sha1


def test_file_sha1_equals_hashlib_over_the_whole_file_across_block_boundaries(tmp_path):
    data = bytes(range(256)) * (3 * (1 << 22) // 256 + 7)      # three 4 MiB blocks and a tail
    path = tmp_path / "w.bin"
    path.write_bytes(data)
    assert file_sha1(path) == hashlib.sha1(data).hexdigest()


def test_state_dict_sha1_follows_the_weights_not_the_object():
    torch.manual_seed(0)
    a = torch.nn.Linear(3, 2)
    b = torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert state_dict_sha1(a) == state_dict_sha1(b)
    expected = hashlib.sha1()
    for k, v in sorted(a.state_dict().items()):
        expected.update(k.encode())
        expected.update(v.numpy().tobytes())
    assert state_dict_sha1(a) == expected.hexdigest()
    with torch.no_grad():
        b.bias[0] += 1e-6
    assert state_dict_sha1(a) != state_dict_sha1(b)
