from spinemri.cli import main

main()
