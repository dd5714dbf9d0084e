// Command noop starts and exits: the bench times it as the least any
// client written in Go costs to run on the machine (its runtime's start
// and exit), beside `restart`.
package main

func main() {}
