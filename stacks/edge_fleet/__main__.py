from stacks.edge_fleet.program import main

main()
