"""The ComponentResources and dynamic resources the stacks are built from; the logic behind them lives in
`appliance/` (appliance/iac, appliance/pki, appliance/dr), these only declare."""
