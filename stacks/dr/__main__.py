from stacks.dr.program import main

main()
