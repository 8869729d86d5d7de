"""Train a small multi-pose model for a few steps and print the loss falling."""

import torch

import combframe

torch.manual_seed(0)
n_compounds, n_poses, n_features = 16, 6, 8
poses = torch.randn(n_compounds, n_poses, 1, n_features)
targets = poses[..., 0].amin(dim=(1, 2))  # the compound's value is set by its best pose

net = torch.nn.Sequential(
    torch.nn.Linear(n_features, 32), torch.nn.SiLU(), torch.nn.Linear(32, 1), torch.nn.Flatten(0)
)
model = combframe.MultiPoseModel(net, combframe.create_combination("max", pred_scale=10.0))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
for epoch in range(20):
    total = 0.0
    for x, y in zip(poses, targets, strict=True):
        optimizer.zero_grad()
        combined, _ = model(list(x))
        loss = (combined - y) ** 2
        loss.backward()
        optimizer.step()
        total += loss.item()
    if epoch % 5 == 0 or epoch == 19:
        print(f"epoch {epoch:2d}  loss {total / n_compounds:.4f}")
