package registry

import (
	"fmt"
	"testing"
)

func TestRegistry(t *testing.T) {
	r := New[func() int]("widget")
	r.Register("b", func() int { return 2 })
	r.Register("a", func() int { return 1 })
	if f, ok := r.Lookup("b"); !ok || f() != 2 {
		t.Fatalf("Lookup(b) found %v", ok)
	}
	if _, ok := r.Lookup("c"); ok {
		t.Fatal("found a name never registered")
	}
	if got := fmt.Sprint(r.Names()); got != "[a b]" {
		t.Fatalf("Names() = %s, want sorted [a b]", got)
	}
	defer func() {
		if p := recover(); p != "widget registered twice: a" {
			t.Fatalf("a duplicate panicked with %v", p)
		}
	}()
	r.Register("a", func() int { return 3 })
}
