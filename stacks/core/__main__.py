from stacks.core.program import main

main()
