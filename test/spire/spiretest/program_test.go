package spiretest

import (
	"bytes"
	"os"
	"slices"
	"strings"
	"testing"
)

func TestProgramRunsCleanupsLastFirst(t *testing.T) {
	var out bytes.Buffer
	p := NewProgram("prog", &out)
	var order []int
	err := p.Run(func(tb testing.TB) {
		tb.Cleanup(func() { order = append(order, 1) })
		tb.Cleanup(func() { order = append(order, 2) })
		tb.Logf("hello %d", 7)
	})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(order, []int{2, 1}) {
		t.Errorf("cleanups ran in order %v, want [2 1]", order)
	}
	if !strings.Contains(out.String(), "prog: hello 7") {
		t.Errorf("log output %q", out.String())
	}
}

func TestProgramFatalEndsRunWithError(t *testing.T) {
	p := NewProgram("prog", &bytes.Buffer{})
	cleaned, after := false, false
	err := p.Run(func(tb testing.TB) {
		tb.Cleanup(func() { cleaned = true })
		tb.Fatalf("broke: %s", "here")
		after = true
	})
	if err == nil || !strings.Contains(err.Error(), "broke: here") {
		t.Errorf("Run = %v, want the Fatalf message", err)
	}
	if !cleaned || after {
		t.Errorf("cleaned %v, code after Fatalf ran %v", cleaned, after)
	}
	if !p.Failed() {
		t.Error("Failed() is false after Fatalf")
	}
}

func TestProgramSkipAndTempDir(t *testing.T) {
	p := NewProgram("prog", &bytes.Buffer{})
	var dir string
	err := p.Run(func(tb testing.TB) {
		dir = tb.TempDir()
		tb.Skipf("no %s here", "SPIRE")
	})
	if err == nil || !strings.Contains(err.Error(), "skipped: no SPIRE here") || !p.Skipped() {
		t.Errorf("Run = %v, skipped %v", err, p.Skipped())
	}
	if dir == "" {
		t.Fatal("no temp dir")
	}
	if _, statErr := statDir(dir); statErr == nil {
		t.Errorf("temp dir %s survived the cleanups", dir)
	}
}

func TestProgramPanicsPropagate(t *testing.T) {
	p := NewProgram("prog", &bytes.Buffer{})
	cleaned := false
	defer func() {
		if r := recover(); r != "boom" {
			t.Errorf("recovered %v, want boom", r)
		}
		if !cleaned {
			t.Error("cleanups did not run before the panic went on")
		}
	}()
	_ = p.Run(func(tb testing.TB) {
		tb.Cleanup(func() { cleaned = true })
		panic("boom")
	})
}

func statDir(dir string) (bool, error) {
	fi, err := os.Stat(dir)
	if err != nil {
		return false, err
	}
	return fi.IsDir(), nil
}
