"""Constants shared by the strategy tests (the fixtures are in conftest.py)."""

EOS = 91  # the tiny model's EOS id
PROMPTS = [[5, 17, 3, 88, 41, 5, 17], [9, 8, 7, 6], [42, 42]]
N = 10  # max_new_tokens of every test
ROWS, WIDTH = 4, 24  # the reference forward's static shape
