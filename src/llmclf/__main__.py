from llmclf.cli import main

main()
