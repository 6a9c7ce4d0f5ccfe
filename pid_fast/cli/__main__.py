from pid_fast.cli import main

main()
