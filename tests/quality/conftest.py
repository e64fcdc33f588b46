import torch

# The quality tests run small models: one intra-op thread avoids oversubscription on a shared CI box
# (two threads were 40x slower per op under load here).
torch.set_num_threads(1)
