from distillscope.cli import main

main()
