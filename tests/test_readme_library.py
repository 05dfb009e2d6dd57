"""The README's "sdcore as a library" example with the built-in model, run as a user copies it:
the block is read from README.md, run in a fresh process, and each image it makes is judged by
the shapes world's detector against its prompt (the example's prompts must suit the model)."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO

EPILOGUE = """
import json
for i, image in enumerate(images):
    image.save(f"image-{i}.png")
print(json.dumps({"threads": torch.get_num_threads()}))
"""


def library_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## sdcore as a library", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block and "builtin:shapes" in block.group(1), "README lost its built-in model example"
    return block.group(1)


def test_the_readme_library_example_draws_what_its_prompts_say(tmp_path):
    from shapesworld.evaluate import judge

    code = library_example()
    prompts = re.findall(r'GenerationRequest\(\s*"([^"]+)"', code)
    assert len(prompts) == 3
    done = subprocess.run(
        [sys.executable, "-c", code + EPILOGUE], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert '{"threads": 1}' in done.stdout  # the thread-count advice is in the example itself
    assert (tmp_path / "red-circle.png").read_bytes() == (tmp_path / "image-0.png").read_bytes()
    for i, prompt in enumerate(prompts):
        judgement = judge(tmp_path / f"image-{i}.png", prompt)
        assert judgement.all_correct, (prompt, judgement.detection)
